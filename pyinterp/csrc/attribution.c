// pyinterp native layer: direct logit attribution, built at the unembedding: chosen residual-stream terms
// (and each attention head's share of a term) through the final norm, frozen at the final residual's scale.

#include "internal.h"

struct pi_attr_term {
    char    name[PI_NAME_MAX];
    int32_t il;
    bool    by_head;                // also split the term (an attention output) by head
    struct ggml_tensor * in;        // the term, recorded during the build
    struct ggml_tensor * out;       // [n_targets, n_tokens] F32 its logit contribution to each target
    struct ggml_tensor * heads;     // [n_targets, n_head, n_tokens] F32 each head's share of it (when by_head)
};

// the attribution a plan asked for
struct pi_attr_plan {
    struct pi_attr_term * terms;
    int32_t n_terms;                // active when n_terms > 0
    struct ggml_context * ctx;      // owns rows
    ggml_backend_buffer_t buf;      // on the output device
    struct ggml_tensor * rows;      // [n_embd, n_targets] F32 the targets' unembedding rows, read from the model file
    char rows_of[PI_NAME_MAX];      // the matrix they are rows of (output.weight, or token_embd.weight when tied)
    const char * failed;            // why the attribution could not be built (NULL: it was)
};

// one per layer, kept with the state
struct pi_attr_layer {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor * eye;       // [1, n_head, n_head] F32 identity: spreads the heads apart (per-head attribution)
};

struct pi_attr {
    struct pi_attr_plan plan;
    struct pi_attr_layer * layers;  // [n_layer]
};

extern const struct pi_recipe pi_recipe_attribution;

static void pi_attr_clear(struct pi_state * st, void * data) {
    struct pi_attr_plan * plan = &((struct pi_attr *) data)->plan;
    if (plan->buf) {
        ggml_backend_buffer_free(plan->buf);
        ggml_free(plan->ctx);
    }
    free(plan->terms);
    memset(plan, 0, sizeof(*plan));
}

// attribute the logits of `targets` to the tensors (names[i], layers[i]) of the residual stream; by_head (or NULL):
// which terms are attention outputs to split by head as well. The targets' unembedding rows are read from the
// model file (model_path) now, not from the weight in the graph: see rows.c.
int pi_set_attribution(struct pi_state * st, const char * model_path, const char ** names, const int32_t * layers,
                       const bool * by_head, int32_t n_terms, const int32_t * targets, int32_t n_targets) {
    struct pi_attr * self = pi_self(st, &pi_recipe_attribution);
    struct pi_attr_plan * plan = &self->plan;
    pi_attr_clear(st, self);
    if (n_targets < 1) {
        return pi_fail(st, "no target tokens");
    }
    // llama.cpp's unembedding: output.weight, or the token embedding when the model ties them
    const char * of = "output.weight";
    int64_t n_embd = 0;
    float * rows = pi_read_rows(st, model_path, of, targets, n_targets, &n_embd);
    if (rows == NULL) {
        of = "token_embd.weight";
        rows = pi_read_rows(st, model_path, of, targets, n_targets, &n_embd);
    }
    if (rows == NULL) {
        return -1;
    }
    struct ggml_init_params params = { ggml_tensor_overhead(), NULL, true };
    plan->ctx  = ggml_init(params);
    plan->rows = ggml_new_tensor_2d(plan->ctx, GGML_TYPE_F32, n_embd, n_targets);
    ggml_set_name(plan->rows, "pi_attribution_rows");
    plan->buf = ggml_backend_alloc_ctx_tensors_from_buft(plan->ctx, pi_layer_buft(st, -1));
    if (plan->buf == NULL) {
        free(rows);
        ggml_free(plan->ctx);
        memset(plan, 0, sizeof(*plan));
        return pi_fail(st, "could not allocate the attribution's unembedding rows");
    }
    ggml_backend_tensor_set(plan->rows, rows, 0, ggml_nbytes(plan->rows));
    free(rows);
    snprintf(plan->rows_of, sizeof(plan->rows_of), "%s", of);
    plan->terms = calloc(n_terms, sizeof(struct pi_attr_term));
    for (int32_t i = 0; i < n_terms; ++i) {
        snprintf(plan->terms[i].name, PI_NAME_MAX, "%s", names[i]);
        plan->terms[i].il = layers[i];
        plan->terms[i].by_head = by_head != NULL && by_head[i];
    }
    plan->n_terms = n_terms;
    pi_update_hook(st);
    pi_drop_graph(st);
    return 0;
}

// contribution of term i to the targets after the last decode: n = n_tokens*n_targets floats, token-major;
// returns 1 when the term was not in the graph
int pi_attribution_read(struct pi_state * st, int32_t i, float * dst, int64_t n) {
    const struct pi_attr * self = pi_self(st, &pi_recipe_attribution);
    if (self->plan.failed) {
        return pi_fail(st, self->plan.failed);
    }
    const struct ggml_tensor * t = self->plan.terms[i].out;
    if (t == NULL) {
        return 1;
    }
    if (ggml_nelements(t) != n) {
        return pi_fail(st, "destination size does not match the attribution");
    }
    ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
    return 0;
}

// each head's share of term i (split by head) after the last decode: n = n_tokens*n_head*n_targets floats,
// token-major, then head
int pi_attribution_heads_read(struct pi_state * st, int32_t i, float * dst, int64_t n) {
    const struct pi_attr * self = pi_self(st, &pi_recipe_attribution);
    const struct pi_attr_term * term = &self->plan.terms[i];
    if (!term->by_head) {
        return pi_fail(st, "this term was not split by head");
    }
    if (term->heads == NULL) {
        snprintf(st->error, sizeof(st->error), "%s-%d is not the output projection of the attention heads "
                 "(through biases, scales and norms only): it cannot be split by head", term->name, term->il);
        return -1;
    }
    if (ggml_nelements(term->heads) != n) {
        return pi_fail(st, "destination size does not match the per-head attribution");
    }
    ggml_backend_tensor_get(term->heads, dst, 0, ggml_nbytes(term->heads));
    return 0;
}

// for every model weight `node` reads, some device reads the weight's buffer and runs `node` (the scheduler's
// test, ggml_backend_sched_backend_from_buffer). A backend may keep a weight in a layout only some ops read (the
// CPU's repacked blocks: its matrix product with F32 activations); where no device runs a node that reads a
// weight, ggml's scheduler aborts the process.
static bool pi_weights_run(const struct ggml_tensor * node) {
    for (int i = 0; i < GGML_MAX_SRC; ++i) {
        const struct ggml_tensor * w = node->src[i];
        if (w == NULL || w->buffer == NULL || ggml_backend_buffer_get_usage(w->buffer) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) {
            continue;
        }
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(w->buffer);
        bool runs = false;
        for (size_t d = 0; d < ggml_backend_dev_count() && !runs; ++d) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(d);
            runs = ggml_backend_dev_supports_buft(dev, buft) && ggml_backend_dev_supports_op(dev, node);
        }
        if (!runs) {
            return false;
        }
    }
    return true;
}

// `heads` [n_embd, n_head, n_tokens] (each head's output through the projection) carried from the projection's
// matrix product `from` up to `node` (the attention term) by the ops between them, made linear: biases dropped
// (no head's), weights and scales kept, an RMS norm frozen at the scale of its actual input, a selection of every
// row in order passed through. NULL for other ops.
static struct ggml_tensor * pi_heads_replay(struct ggml_context * ctx, struct ggml_tensor * node,
                                            struct ggml_tensor * from, struct ggml_tensor * heads) {
    if (node == from) {
        return heads;
    }
    if (node->src[0] == NULL) {
        return NULL;
    }
    struct ggml_tensor * x = pi_heads_replay(ctx, node->src[0], from, heads);
    if (x == NULL) {
        return NULL;
    }
    const bool weight = node->src[1] != NULL && node->src[1]->op == GGML_OP_NONE; // a model tensor, not an activation
    float p0;
    memcpy(&p0, node->op_params, sizeof(float));
    switch (node->op) {
        case GGML_OP_ADD:   return weight ? x : NULL;
        case GGML_OP_MUL:   return weight ? ggml_mul(ctx, x, node->src[1]) : NULL;
        case GGML_OP_SCALE: return ggml_scale(ctx, x, p0);
        // the last layer keeps the rows of the output tokens (inp_out_ids); pyinterp outputs every token, in order
        case GGML_OP_GET_ROWS: return node->ne[1] == node->src[0]->ne[1] ? x : NULL;
        case GGML_OP_RMS_NORM: {
            struct ggml_tensor * in  = node->src[0];
            struct ggml_tensor * rms = ggml_sqrt(ctx, ggml_scale_bias(ctx, ggml_mean(ctx, ggml_sqr(ctx, in)), 1.0f, p0));
            return ggml_div(ctx, x, ggml_reshape_3d(ctx, rms, 1, 1, in->ne[1]));
        }
        default: return NULL;
    }
}

// the attention term `term` split by head: [n_embd, n_head, n_tokens] whose sum over heads is the term less its
// biases, or NULL when the term is not the output projection of the heads through the ops pi_heads_replay knows.
// Each head's rows of the projection input are copied apart (the rest zero) and go through the model's own
// projection matrix, so every head is multiplied by its slice of W_O, in the weight's own type.
static struct ggml_tensor * pi_split_heads(struct pi_state * st, struct pi_attr * self, struct ggml_context * ctx,
                                           struct ggml_tensor * term, int32_t il) {
    struct ggml_tensor * mm = term;
    while (mm != NULL && mm->op != GGML_OP_MUL_MAT) {
        mm = mm->src[0];
    }
    if (mm == NULL || mm->src[0]->op != GGML_OP_NONE || ggml_nrows(mm) != mm->ne[1]) {
        return NULL;
    }
    struct ggml_tensor * z = mm->src[1];    // [n_head*d, n_tokens], the heads' outputs side by side
    const int64_t n_head = st->n_head;
    const int64_t n_tokens = z->ne[1];
    if (z->ne[0] % n_head != 0 || ggml_nrows(z) != n_tokens) {
        return NULL;
    }
    const int64_t d = z->ne[0] / n_head;
    if (!ggml_is_contiguous(z)) {
        z = ggml_cont(ctx, z);
    }
    // [d, n_head (slot), n_head (which head is kept), n_tokens]
    struct ggml_tensor * apart = ggml_repeat_4d(ctx, ggml_reshape_4d(ctx, z, d, n_head, 1, n_tokens), d, n_head, n_head, n_tokens);
    apart = ggml_mul(ctx, apart, ggml_reshape_4d(ctx, self->layers[il].eye, 1, n_head, n_head, 1));
    struct ggml_tensor * out = ggml_mul_mat(ctx, mm->src[0], ggml_reshape_2d(ctx, apart, d * n_head, n_head * n_tokens));
    if (!pi_weights_run(out)) {
        self->plan.failed = "per-head logit attribution: no backend multiplies the heads by the attention output "
                          "projection in the buffer that holds it";
        return NULL;
    }
    out = ggml_reshape_3d(ctx, out, out->ne[0], n_head, n_tokens);
    return pi_heads_replay(ctx, term, mm, out);
}

// at result_output: each term's contribution to the target logits, the final norm's scale frozen
//   contribution = (term / rms(final residual) * norm weight) . unembedding row of the target
static void pi_attr_output(struct pi_state * st, void * data, struct ggml_context * ctx, struct ggml_cgraph * gf,
                           struct ggml_tensor * out) {
    struct pi_attr * self = data;
    struct pi_attr_plan * attr = &self->plan;
    struct ggml_tensor * mm = pi_unembedding(out);
    struct ggml_tensor * normed = mm ? mm->src[1] : NULL;
    if (st->final_in == NULL || normed == NULL || normed->op != GGML_OP_MUL || normed->src[0]->op != GGML_OP_RMS_NORM ||
        normed->src[0]->src[0] != st->final_in) {
        attr->failed = "logit attribution needs a final RMS norm with a weight before the unembedding";
        return;
    }
    float eps;
    memcpy(&eps, normed->src[0]->op_params, sizeof(float));
    if (strcmp(mm->src[0]->name, attr->rows_of) != 0 || mm->src[0]->ne[0] != attr->rows->ne[0]) {
        attr->failed = "logit attribution: the unembedding in the graph is not the model file's output.weight "
                       "(or token_embd.weight when tied)";
        return;
    }
    struct ggml_tensor * weight = normed->src[1];
    struct ggml_tensor * rows   = attr->rows; // [n_embd, n_targets]
    struct ggml_tensor * rms    = ggml_sqrt(ctx, ggml_scale_bias(ctx, ggml_mean(ctx, ggml_sqr(ctx, st->final_in)), 1.0f, eps));
    for (int32_t i = 0; i < attr->n_terms; ++i) {
        struct pi_attr_term * term = &attr->terms[i];
        if (term->in == NULL || term->in->ne[0] != st->final_in->ne[0]) {
            continue;
        }
        if (!pi_room(gf, PI_ROOM)) {
            attr->failed = PI_NO_ROOM;
            return;
        }
        struct ggml_tensor * x = ggml_mul(ctx, ggml_div(ctx, term->in, rms), weight);
        term->out = ggml_mul_mat(ctx, rows, x);
        ggml_format_name(term->out, "attribution %s-%d", term->name, term->il);
        ggml_set_output(term->out);
        ggml_build_forward_expand(gf, term->out);
        if (!term->by_head || term->il < 0 || term->il >= st->n_layer) {
            continue;
        }
        struct ggml_tensor * heads = pi_split_heads(st, self, ctx, term->in, term->il); // [n_embd, n_head, n_tokens]
        if (heads == NULL) {
            continue;
        }
        heads = ggml_mul(ctx, ggml_div(ctx, heads, ggml_reshape_3d(ctx, rms, 1, 1, rms->ne[1])), weight);
        term->heads = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, rows, ggml_reshape_2d(ctx, heads, heads->ne[0], heads->ne[1] * heads->ne[2])),
                                      rows->ne[1], heads->ne[1], heads->ne[2]);
        ggml_format_name(term->heads, "attribution %s-%d by head", term->name, term->il);
        ggml_set_output(term->heads);
        ggml_build_forward_expand(gf, term->heads);
    }
}

// the identity that spreads the heads apart, on every layer's device
static bool pi_attr_init(struct pi_state * st, void * data) {
    struct pi_attr * self = data;
    self->layers = calloc(st->n_layer, sizeof(struct pi_attr_layer));
    float * eye = calloc((size_t) st->n_head * st->n_head, sizeof(float));
    for (int32_t h = 0; h < st->n_head; ++h) {
        eye[h * st->n_head + h] = 1.0f;
    }
    bool ok = true;
    for (int32_t il = 0; il < st->n_layer && ok; ++il) {
        struct pi_attr_layer * layer = &self->layers[il];
        struct ggml_init_params params = { ggml_tensor_overhead(), NULL, true };
        layer->ctx = ggml_init(params);
        layer->eye = ggml_new_tensor_3d(layer->ctx, GGML_TYPE_F32, 1, st->n_head, st->n_head);
        ggml_format_name(layer->eye, "pi_eye-%d", il);
        layer->buf = ggml_backend_alloc_ctx_tensors_from_buft(layer->ctx, pi_layer_buft(st, il));
        ok = layer->buf != NULL;
        if (ok) {
            ggml_backend_tensor_set(layer->eye, eye, 0, ggml_nbytes(layer->eye));
        }
    }
    free(eye);
    return ok;
}

static void pi_attr_release(struct pi_state * st, void * data) {
    struct pi_attr * self = data;
    for (int32_t il = 0; il < st->n_layer && self->layers != NULL; ++il) {
        if (self->layers[il].buf) {
            ggml_backend_buffer_free(self->layers[il].buf);
        }
        if (self->layers[il].ctx) {
            ggml_free(self->layers[il].ctx);
        }
    }
    free(self->layers);
}

static bool pi_attr_active(const struct pi_state * st, const void * data) {
    const struct pi_attr * self = data;
    return self->plan.n_terms > 0;
}

static void pi_attr_begin(struct pi_state * st, void * data) {
    struct pi_attr_plan * plan = &((struct pi_attr *) data)->plan;
    for (int32_t i = 0; i < plan->n_terms; ++i) {
        plan->terms[i].in    = NULL;
        plan->terms[i].out   = NULL;
        plan->terms[i].heads = NULL;
    }
    plan->failed = NULL;
}

// note the terms, as the interventions left them
static struct ggml_tensor * pi_attr_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                           struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                           int32_t il) {
    struct pi_attr_plan * plan = &((struct pi_attr *) data)->plan;
    for (int32_t i = 0; i < plan->n_terms; ++i) {
        struct pi_attr_term * term = &plan->terms[i];
        if (term->in == NULL && term->il == il && strcmp(term->name, name) == 0) {
            term->in = cur;
        }
    }
    return cur;
}

const struct pi_recipe pi_recipe_attribution = {
    .name    = "attribution",
    .size    = sizeof(struct pi_attr),
    .init    = pi_attr_init,
    .clear   = pi_attr_clear,
    .release = pi_attr_release,
    .active  = pi_attr_active,
    .begin   = pi_attr_begin,
    .tensor  = pi_attr_tensor,
    .output  = pi_attr_output,
};
