// pyinterp native layer: the local replacement model of one prompt. Its norms are frozen (x times a given
// per-token scale, then the norm's weight, instead of rms_norm(x) times the weight) and its attention is
// frozen (given attention weights times the layer's own V, instead of the softmax of Q.K), so the graph is
// linear in the residual stream; and tensors are replaced by given rows, one per token of the decode (each
// sequence its own: what one source node writes). The measure half outputs the scales the norms have in a
// normal pass.
//
// Every sequence of a frozen decode holds the same n_pos tokens (copies of the prompt, each with its own
// injections): a layer's attention mixes the V rows of each sequence with the same weights, and does not read
// the KV cache.

#include "internal.h"

#define PI_FREEZE_ROOM 16       // graph nodes one frozen norm or attention may add, at most

// a norm measured: the scale 1/rms(x) of every token
struct pi_norm_measure {
    char    name[PI_NAME_MAX];
    int32_t il;
    bool    done;
    struct ggml_tensor * out;       // [1, n_tokens] F32 of the last build
};

enum pi_frozen_kind {
    PI_FROZEN_NORM,
    PI_FROZEN_ATTENTION,
    PI_FROZEN_ROWS,
};

// a norm or an attention frozen to given values, or a tensor replaced by given rows
struct pi_frozen {
    enum pi_frozen_kind kind;
    char    name[PI_NAME_MAX];      // the norm's tensor, "kqv_out" for attention, the replaced tensor
    int32_t il;
    int32_t n_head;                 // attention: heads of the given weights
    int64_t width;                  // rows: values per row
    int64_t n_rows;                 // rows: one per token of the decode
    float * host;                   // norm: [n_pos] scales; attention: [n_head][n_pos query][n_pos key] weights;
                                    // rows: [n_rows][width]
    struct ggml_tensor * data;      // norm: [1, n_pos]; attention: [n_pos, n_pos, n_head]; rows: [width, n_rows]
    struct ggml_tensor * v;         // attention: the layer's V [head_dim, n_head_kv, n_tokens] in this build
    bool    done;
};

struct pi_freeze {
    struct pi_norm_measure * measures;
    int32_t n_measures;
    struct pi_frozen * frozen;
    int32_t n_frozen;
    int32_t n_pos;                  // tokens of every sequence of a frozen decode
    int32_t n_seq;                  // sequences of the current decode
    bool    uploaded;
    struct ggml_context * data_ctx;
    struct pi_pool pool[PI_MAX_POOLS];
};

extern const struct pi_recipe pi_recipe_freeze;

static void pi_freeze_clear(struct pi_state * st, void * data) {
    struct pi_freeze * self = data;
    for (int32_t i = 0; i < self->n_frozen; ++i) {
        free(self->frozen[i].host);
    }
    free(self->measures);
    free(self->frozen);
    if (self->data_ctx) {
        ggml_free(self->data_ctx);
    }
    struct pi_pool pool[PI_MAX_POOLS];
    memcpy(pool, self->pool, sizeof(pool));
    memset(self, 0, sizeof(*self));
    memcpy(self->pool, pool, sizeof(pool)); // device memory is kept across plans
}

static void pi_freeze_release(struct pi_state * st, void * data) {
    pi_pools_free(((struct pi_freeze *) data)->pool);
}

static bool pi_freeze_active(const struct pi_state * st, const void * data) {
    const struct pi_freeze * self = data;
    return self->n_measures > 0 || self->n_frozen > 0;
}

int32_t pi_norm_measure(struct pi_state * st, const char * name, int32_t il) {
    struct pi_freeze * self = pi_self(st, &pi_recipe_freeze);
    if (strlen(name) >= PI_NAME_MAX || il < -1 || il >= st->n_layer) {
        return pi_fail(st, "bad norm name or layer");
    }
    self->measures = realloc(self->measures, (self->n_measures + 1) * sizeof(*self->measures));
    struct pi_norm_measure * m = &self->measures[self->n_measures];
    memset(m, 0, sizeof(*m));
    snprintf(m->name, sizeof(m->name), "%s", name);
    m->il = il;
    pi_update_hook(st);
    pi_drop_graph(st);
    return self->n_measures++;
}

int pi_norm_scale_read(struct pi_state * st, int32_t i, float * dst, int64_t n) {
    struct pi_freeze * self = pi_self(st, &pi_recipe_freeze);
    if (i < 0 || i >= self->n_measures || self->measures[i].out == NULL) {
        return pi_fail(st, "that norm was not measured in the last decode");
    }
    return pi_read_f32(st, self->measures[i].out, dst, n, 1);
}

static struct pi_frozen * pi_frozen_add(struct pi_state * st, enum pi_frozen_kind kind, const char * name, int32_t il,
                                        const float * values, int64_t n_values, int32_t n_pos) {
    struct pi_freeze * self = pi_self(st, &pi_recipe_freeze);
    if (strlen(name) >= PI_NAME_MAX || il < -1 || il >= st->n_layer || n_pos < 1 || n_values < 1) {
        pi_fail(st, "bad name, layer, size or number of positions");
        return NULL;
    }
    if (self->n_frozen > 0 && n_pos != self->n_pos) {
        pi_fail(st, "every frozen norm, attention and rows of a plan has the same number of positions");
        return NULL;
    }
    self->frozen = realloc(self->frozen, (self->n_frozen + 1) * sizeof(*self->frozen));
    struct pi_frozen * f = &self->frozen[self->n_frozen++];
    memset(f, 0, sizeof(*f));
    f->kind = kind;
    snprintf(f->name, sizeof(f->name), "%s", name);
    f->il   = il;
    f->host = malloc(n_values * sizeof(float));
    memcpy(f->host, values, n_values * sizeof(float));
    self->n_pos    = n_pos;
    self->uploaded = false;
    pi_update_hook(st);
    pi_drop_graph(st);
    return f;
}

int pi_freeze_norm(struct pi_state * st, const char * name, int32_t il, const float * scales, int32_t n_pos) {
    return pi_frozen_add(st, PI_FROZEN_NORM, name, il, scales, n_pos, n_pos) ? 0 : -1;
}

int pi_freeze_attention(struct pi_state * st, int32_t il, const float * weights, int32_t n_head, int32_t n_pos) {
    if (il < 0 || n_head < 1) {
        return pi_fail(st, "frozen attention needs a layer and its heads");
    }
    struct pi_frozen * f = pi_frozen_add(st, PI_FROZEN_ATTENTION, "kqv_out", il, weights, (int64_t) n_head * n_pos * n_pos,
                                         n_pos);
    if (f == NULL) {
        return -1;
    }
    f->n_head = n_head;
    return 0;
}

int pi_freeze_rows(struct pi_state * st, const char * name, int32_t il, const float * rows, int64_t width, int64_t n_rows,
                   int32_t n_pos) {
    if (width < 1 || n_pos < 1 || n_rows < 1 || n_rows % n_pos != 0) {
        return pi_fail(st, "replacement rows must be [n_seq * n_pos][width]");
    }
    struct pi_frozen * f = pi_frozen_add(st, PI_FROZEN_ROWS, name, il, rows, width * n_rows, n_pos);
    if (f == NULL) {
        return -1;
    }
    f->width  = width;
    f->n_rows = n_rows;
    return 0;
}

// the frozen values, to device memory (once per plan)
static int pi_freeze_upload(struct pi_state * st, struct pi_freeze * self) {
    if (self->data_ctx) {
        ggml_free(self->data_ctx);
    }
    struct ggml_init_params params = { (self->n_frozen + 1) * ggml_tensor_overhead(), NULL, true };
    self->data_ctx = ggml_init(params);
    struct ggml_tensor ** tensors = malloc((self->n_frozen + 1) * sizeof(*tensors));
    ggml_backend_buffer_type_t * bufts = malloc((self->n_frozen + 1) * sizeof(*bufts));
    for (int32_t i = 0; i < self->n_frozen; ++i) {
        struct pi_frozen * f = &self->frozen[i];
        switch (f->kind) {
            case PI_FROZEN_NORM:
                f->data = ggml_new_tensor_2d(self->data_ctx, GGML_TYPE_F32, 1, self->n_pos);
                break;
            case PI_FROZEN_ATTENTION:
                f->data = ggml_new_tensor_3d(self->data_ctx, GGML_TYPE_F32, self->n_pos, self->n_pos, f->n_head);
                break;
            case PI_FROZEN_ROWS:
                f->data = ggml_new_tensor_2d(self->data_ctx, GGML_TYPE_F32, f->width, f->n_rows);
                break;
        }
        ggml_format_name(f->data, "pi_frozen-%s-%d", f->name, f->il);
        tensors[i] = f->data;
        bufts[i]   = pi_layer_buft(st, f->il);
    }
    const bool placed = pi_pools_place(self->pool, tensors, bufts, self->n_frozen);
    free(tensors);
    free(bufts);
    if (!placed) {
        return pi_fail(st, "could not allocate device memory for the frozen norms and attention");
    }
    for (int32_t i = 0; i < self->n_frozen; ++i) {
        ggml_backend_tensor_set(self->frozen[i].data, self->frozen[i].host, 0, ggml_nbytes(self->frozen[i].data));
    }
    self->uploaded = true;
    return 0;
}

static int pi_freeze_prepare(struct pi_state * st, void * data, const struct pi_batch * batch) {
    struct pi_freeze * self = data;
    if (self->n_frozen == 0) {
        return 0;
    }
    for (int32_t s = 0; s < batch->n_seq; ++s) {
        if (batch->n_tokens[s] != self->n_pos || batch->pos0[s] != 0) {
            return pi_fail(st, "a frozen decode needs every sequence to hold the prompt's tokens from position 0");
        }
    }
    for (int32_t i = 0; i < self->n_frozen; ++i) {
        if (self->frozen[i].kind == PI_FROZEN_ROWS && self->frozen[i].n_rows != (int64_t) batch->n_seq * self->n_pos) {
            return pi_fail(st, "replacement rows: not one per token of this decode");
        }
    }
    if (batch->n_seq != self->n_seq) {
        self->n_seq = batch->n_seq;
        pi_drop_graph(st);
    }
    if (!self->uploaded && pi_freeze_upload(st, self) != 0) {
        return -1;
    }
    return 0;
}

static void pi_freeze_begin(struct pi_state * st, void * data) {
    struct pi_freeze * self = data;
    for (int32_t i = 0; i < self->n_measures; ++i) {
        self->measures[i].done = false;
        self->measures[i].out  = NULL;
    }
    for (int32_t i = 0; i < self->n_frozen; ++i) {
        self->frozen[i].done = false;
        self->frozen[i].v    = NULL;
    }
}

// x of a norm llama.cpp built as rms_norm(x) * weight, or NULL
static struct ggml_tensor * pi_norm_input(const struct ggml_tensor * cur) {
    if (cur->op != GGML_OP_MUL || cur->src[0] == NULL || cur->src[0]->op != GGML_OP_RMS_NORM) {
        return NULL;
    }
    return cur->src[0]->src[0];
}

// the per-token scale of the norm cur: sum(rms_norm(x) * x) / sum(x * x) = 1/rms(x), [1, n_tokens]
static struct ggml_tensor * pi_norm_scale(struct ggml_context * ctx, struct ggml_tensor * cur) {
    struct ggml_tensor * x = pi_norm_input(cur);
    struct ggml_tensor * n = ggml_sum_rows(ctx, ggml_mul(ctx, cur->src[0], x));
    return ggml_div(ctx, n, ggml_sum_rows(ctx, ggml_sqr(ctx, x)));
}

// one sequence's [.., n_pos, ..] frozen values repeated for every sequence of the decode
static struct ggml_tensor * pi_per_sequence(struct ggml_context * ctx, struct ggml_tensor * t, int32_t n_seq) {
    return ggml_repeat_4d(ctx, t, t->ne[0], t->ne[1], t->ne[2], n_seq);
}

// rms_norm(x) * w becomes x * scale * w
static struct ggml_tensor * pi_frozen_norm(struct pi_state * st, struct pi_freeze * self, struct ggml_context * ctx,
                                           struct pi_frozen * f, struct ggml_tensor * cur) {
    struct ggml_tensor * x = pi_norm_input(cur);
    if (x == NULL || x->ne[1] != st->n_ubatch || x->ne[2] != 1) {
        st->build_failed = "a frozen norm met a tensor that is not rms_norm(x) * weight over every token";
        return cur;
    }
    struct ggml_tensor * scale = ggml_reshape_2d(ctx, pi_per_sequence(ctx, ggml_reshape_3d(ctx, f->data, 1, self->n_pos, 1),
                                                                      self->n_seq), 1, st->n_ubatch);
    struct ggml_tensor * out = ggml_mul(ctx, ggml_mul(ctx, x, scale), cur->src[1]);
    ggml_format_name(out, "%s (frozen)", cur->name);
    return out;
}

// the attention output [head_dim * n_head, n_tokens]: per sequence, out[:, h, q] = sum_k w[h][q][k] V[:, h's kv head, k]
static struct ggml_tensor * pi_frozen_attention(struct pi_state * st, struct pi_freeze * self, struct ggml_context * ctx,
                                                struct pi_frozen * f, struct ggml_tensor * cur) {
    struct ggml_tensor * v = f->v;
    const int64_t n_pos = self->n_pos, n_seq = self->n_seq;
    if (v == NULL || v->ne[2] != st->n_ubatch || f->n_head % v->ne[1] != 0 || cur->ne[0] != v->ne[0] * f->n_head ||
        cur->ne[1] != st->n_ubatch) {
        st->build_failed = "frozen attention: the layer's V or attention output has an unexpected shape";
        return cur;
    }
    const int64_t head_dim = v->ne[0], n_head_kv = v->ne[1];
    struct ggml_tensor * v4 = ggml_reshape_4d(ctx, ggml_cont(ctx, v), head_dim, n_head_kv, n_pos, n_seq);
    struct ggml_tensor * vk = ggml_cont(ctx, ggml_permute(ctx, v4, 1, 2, 0, 3));      // [n_pos, head_dim, n_head_kv, n_seq]
    struct ggml_tensor * w  = pi_per_sequence(ctx, f->data, n_seq);                  // [n_pos k, n_pos q, n_head, n_seq]
    struct ggml_tensor * o  = ggml_mul_mat(ctx, vk, w);                              // [head_dim, n_pos, n_head, n_seq]
    o = ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3));                            // [head_dim, n_head, n_pos, n_seq]
    struct ggml_tensor * out = ggml_reshape_2d(ctx, o, head_dim * f->n_head, st->n_ubatch);
    ggml_format_name(out, "%s (frozen)", cur->name);
    return out;
}

// the given rows in place of cur, which is not read: what only led to it is left out of the computation
static struct ggml_tensor * pi_frozen_rows(struct pi_state * st, struct ggml_context * ctx, struct pi_frozen * f,
                                           struct ggml_tensor * cur) {
    if (ggml_nelements(cur) != f->width * f->n_rows || cur->ne[0] != f->width) {
        st->build_failed = "replacement rows: the tensor is not [width, n_tokens]";
        return cur;
    }
    struct ggml_tensor * out = ggml_reshape_4d(ctx, f->data, cur->ne[0], cur->ne[1], cur->ne[2], cur->ne[3]);
    ggml_format_name(out, "%s (replaced)", cur->name);
    st->injected = out;
    return out;
}

static struct ggml_tensor * pi_freeze_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                             struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                             int32_t il) {
    struct pi_freeze * self = data;
    for (int32_t i = 0; i < self->n_measures; ++i) {
        struct pi_norm_measure * m = &self->measures[i];
        if (m->done || m->il != il || strcmp(m->name, name) != 0) {
            continue;
        }
        m->done = true;
        if (pi_norm_input(cur) == NULL) {
            st->build_failed = "a measured norm is not rms_norm(x) * weight";
        } else if (!pi_room(gf, PI_FREEZE_ROOM)) {
            st->build_failed = PI_NO_ROOM;
        } else {
            m->out = pi_norm_scale(ctx, cur);
            ggml_set_output(m->out);
            ggml_build_forward_expand(gf, m->out);
            pi_keep(st, cur, m->out);
        }
    }
    for (int32_t i = 0; i < self->n_frozen; ++i) {
        struct pi_frozen * f = &self->frozen[i];
        if (f->kind == PI_FROZEN_ATTENTION && il == f->il && strcmp(name, "Vcur") == 0 && cur->ne[2] == st->n_ubatch) {
            f->v = cur; // the last form llama.cpp names: [head_dim, n_head_kv, n_tokens]
        }
        if (f->done || f->il != il || strcmp(f->name, name) != 0) {
            continue;
        }
        f->done = true;
        if (!pi_room(gf, PI_FREEZE_ROOM)) {
            st->build_failed = PI_NO_ROOM;
            continue;
        }
        switch (f->kind) {
            case PI_FROZEN_NORM:      cur = pi_frozen_norm(st, self, ctx, f, cur);      break;
            case PI_FROZEN_ATTENTION: cur = pi_frozen_attention(st, self, ctx, f, cur); break;
            case PI_FROZEN_ROWS:      cur = pi_frozen_rows(st, ctx, f, cur);            break;
        }
    }
    return cur;
}

const struct pi_recipe pi_recipe_freeze = {
    .name    = "freeze",
    .size    = sizeof(struct pi_freeze),
    .clear   = pi_freeze_clear,
    .release = pi_freeze_release,
    .active  = pi_freeze_active,
    .prepare = pi_freeze_prepare,
    .begin   = pi_freeze_begin,
    .tensor  = pi_freeze_tensor,
};
