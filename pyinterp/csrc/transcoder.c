// pyinterp native layer: transcoders in the graph. A transcoder reads one tensor (an MLP's input) and writes
// another (its output): features of the input per token, reconstruction statistics at the output, and the
// output replaced by the reconstruction (error dropped) or edited by feature changes (error kept). A
// cross-layer transcoder's features, kept from their layer's build, write to every later layer they reach.

#include "internal.h"

struct pi_transcoder {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor * w_enc_t;   // [d_model, d_tc] ggml: one row of d_model per feature
    struct ggml_tensor * b_enc;     // [d_tc]
    struct ggml_tensor * w_dec_t;   // [d_tc, d_model, n_out]: decoder j (to layer il + j), transposed
    struct ggml_tensor * b_dec;     // [d_model]
    struct ggml_tensor * threshold; // [d_tc] (JumpReLU)
    struct ggml_tensor * w_skip_t;  // [d_model, d_model] or NULL
    int32_t il;
    int32_t n_out;
    int32_t activation;
    int32_t k;
};

// one transcoder attached to this plan
struct pi_tc_use {
    struct pi_transcoder * tc;
    char    in_name[PI_NAME_MAX];
    char    out_name[PI_NAME_MAX];
    int32_t top_k;
    int32_t mode;
    int32_t n_edits;
    bool    edit_scale;
    struct ggml_context * ctx;        // owns edit_ids, edit_values
    ggml_backend_buffer_t buf;
    struct ggml_tensor * edit_ids;    // [n_edits] I32
    struct ggml_tensor * edit_values; // [1, n_edits] F32
    // the last build
    bool in_done;
    bool out_done;
    struct ggml_tensor * x;           // [d_model, n] the input
    struct ggml_tensor * f;           // [d_tc, n] its features
    struct ggml_tensor * delta;       // [d_tc, n] the edits' change of f, or NULL
    struct ggml_tensor * ids;         // [top_k, n] I32
    struct ggml_tensor * values;      // [1, top_k, n]
    struct ggml_tensor * stats;       // [3, n]
};

struct pi_tcs {
    struct pi_tc_use * uses;
    int32_t n_uses;
};

extern const struct pi_recipe pi_recipe_transcoder;

struct pi_transcoder * pi_tc_load(struct pi_state * st, int32_t il, int32_t d_model, int32_t d_tc, int32_t n_out,
                                  const float * w_enc_t, const float * b_enc, const float * w_dec_t,
                                  const float * b_dec, const float * threshold, const float * w_skip_t,
                                  int32_t activation, int32_t k) {
    if (il < 0 || il >= st->n_layer || n_out < 1 || il + n_out > st->n_layer || d_model < 1 || d_tc < 1 ||
        activation < PI_SAE_RELU || activation > PI_SAE_TOPK || (activation == PI_SAE_TOPK && (k < 1 || k > d_tc)) ||
        (activation == PI_SAE_JUMPRELU && threshold == NULL)) {
        pi_fail(st, "bad transcoder layer, shape, activation or k");
        return NULL;
    }
    struct pi_transcoder * tc = calloc(1, sizeof(struct pi_transcoder));
    struct ggml_init_params params = { 6*ggml_tensor_overhead(), NULL, true };
    tc->ctx = ggml_init(params);
    tc->w_enc_t   = ggml_new_tensor_2d(tc->ctx, GGML_TYPE_F32, d_model, d_tc);
    tc->b_enc     = ggml_new_tensor_1d(tc->ctx, GGML_TYPE_F32, d_tc);
    tc->w_dec_t   = ggml_new_tensor_3d(tc->ctx, GGML_TYPE_F32, d_tc, d_model, n_out);
    tc->b_dec     = ggml_new_tensor_1d(tc->ctx, GGML_TYPE_F32, d_model);
    tc->threshold = ggml_new_tensor_1d(tc->ctx, GGML_TYPE_F32, d_tc);
    tc->w_skip_t  = w_skip_t != NULL ? ggml_new_tensor_2d(tc->ctx, GGML_TYPE_F32, d_model, d_model) : NULL;
    struct ggml_tensor * tensors[] = { tc->w_enc_t, tc->b_enc, tc->w_dec_t, tc->b_dec, tc->threshold, tc->w_skip_t };
    const void * data[] = { w_enc_t, b_enc, w_dec_t, b_dec, threshold, w_skip_t };
    tc->buf = pi_alloc_upload(tc->ctx, pi_layer_buft(st, il), tensors, data, 6);
    if (tc->buf == NULL) {
        ggml_free(tc->ctx);
        free(tc);
        pi_fail(st, "could not allocate device memory for the transcoder");
        return NULL;
    }
    tc->il         = il;
    tc->n_out      = n_out;
    tc->activation = activation;
    tc->k          = k;
    return tc;
}

void pi_tc_free(struct pi_transcoder * tc) {
    if (tc != NULL) {
        ggml_backend_buffer_free(tc->buf);
        ggml_free(tc->ctx);
        free(tc);
    }
}

static void pi_tcs_clear(struct pi_state * st, void * data) {
    struct pi_tcs * self = data;
    for (int32_t i = 0; i < self->n_uses; ++i) {
        if (self->uses[i].buf) {
            ggml_backend_buffer_free(self->uses[i].buf);
            ggml_free(self->uses[i].ctx);
        }
    }
    free(self->uses);
    self->uses   = NULL;
    self->n_uses = 0;
}

static bool pi_tcs_active(const struct pi_state * st, const void * data) {
    const struct pi_tcs * self = data;
    return self->n_uses > 0;
}

static int pi_tc_check(struct pi_state * st, const struct pi_tcs * self, const struct pi_transcoder * tc,
                       const char * in_name, const char * out_name, int32_t top_k, int32_t mode,
                       const int32_t * edit_ids, int32_t n_edits) {
    if (strlen(in_name) >= PI_NAME_MAX || strlen(out_name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    if (top_k < 1 || top_k > tc->b_enc->ne[0] || mode < PI_TC_ENCODE || mode > PI_TC_DROP_ERROR || n_edits < 0) {
        return pi_fail(st, "top_k, mode or number of edits out of range");
    }
    for (int32_t i = 0; i < self->n_uses; ++i) {
        if (self->uses[i].tc->il == tc->il) {
            return pi_fail(st, "a transcoder of this layer is attached already");
        }
    }
    for (int32_t i = 0; i < n_edits; ++i) {
        if (edit_ids[i] < 0 || edit_ids[i] >= tc->b_enc->ne[0]) {
            return pi_fail(st, "edited feature out of range");
        }
        for (int32_t j = 0; j < i; ++j) {
            if (edit_ids[j] == edit_ids[i]) {
                return pi_fail(st, "a feature is edited twice");
            }
        }
    }
    return 0;
}

int32_t pi_tc_attach(struct pi_state * st, struct pi_transcoder * tc, const char * in_name, const char * out_name,
                     int32_t top_k, int32_t mode, const int32_t * edit_ids, const float * edit_values,
                     int32_t n_edits, bool edit_scale) {
    struct pi_tcs * self = pi_self(st, &pi_recipe_transcoder);
    if (pi_tc_check(st, self, tc, in_name, out_name, top_k, mode, edit_ids, n_edits) != 0) {
        return -1;
    }
    struct pi_tc_use use = {0};
    use.tc = tc;
    snprintf(use.in_name, sizeof(use.in_name), "%s", in_name);
    snprintf(use.out_name, sizeof(use.out_name), "%s", out_name);
    use.top_k      = top_k;
    use.mode       = mode;
    use.n_edits    = n_edits;
    use.edit_scale = edit_scale;
    if (n_edits > 0) {
        struct ggml_init_params params = { 2*ggml_tensor_overhead(), NULL, true };
        use.ctx = ggml_init(params);
        use.edit_ids    = ggml_new_tensor_1d(use.ctx, GGML_TYPE_I32, n_edits);
        use.edit_values = ggml_new_tensor_2d(use.ctx, GGML_TYPE_F32, 1, n_edits);
        use.buf = ggml_backend_alloc_ctx_tensors_from_buft(use.ctx, pi_layer_buft(st, tc->il));
        if (use.buf == NULL) {
            ggml_free(use.ctx);
            return pi_fail(st, "could not allocate the transcoder edits");
        }
        ggml_backend_tensor_set(use.edit_ids, edit_ids, 0, ggml_nbytes(use.edit_ids));
        ggml_backend_tensor_set(use.edit_values, edit_values, 0, ggml_nbytes(use.edit_values));
    }
    self->uses = realloc(self->uses, (self->n_uses + 1) * sizeof(struct pi_tc_use));
    self->uses[self->n_uses++] = use;
    pi_update_hook(st);
    pi_drop_graph(st);
    return self->n_uses - 1;
}

static void pi_tc_output(struct ggml_cgraph * gf, struct ggml_tensor * t, const char * what, const struct pi_tc_use * use) {
    ggml_format_name(t, "tc %s %s-%d", what, use->in_name, use->tc->il);
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
}

// the edits' change of the features f [d_tc, n], [d_tc, n]: zero but in the edited features' rows
static struct ggml_tensor * pi_tc_delta(struct ggml_context * ctx, const struct pi_tc_use * use, struct ggml_tensor * f) {
    struct ggml_tensor * ft     = ggml_cont(ctx, ggml_transpose(ctx, f));                         // [n, d_tc]
    struct ggml_tensor * fe     = ggml_get_rows(ctx, ft, use->edit_ids);                          // [n, n_edits]
    struct ggml_tensor * values = ggml_reshape_2d(ctx, use->edit_values, 1, use->n_edits);
    struct ggml_tensor * change = use->edit_scale ? ggml_mul(ctx, fe, ggml_scale_bias(ctx, values, 1.0f, -1.0f))
                                                  : ggml_scale(ctx, ggml_sub(ctx, fe, values), -1.0f);
    struct ggml_tensor * rows   = ggml_set_rows(ctx, ggml_scale(ctx, ft, 0.0f), change, use->edit_ids);
    return ggml_cont(ctx, ggml_transpose(ctx, rows));
}

// at the input: the features, their top_k per token, the edits' change
static void pi_tc_encode(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                         struct pi_tc_use * use, struct ggml_tensor * cur) {
    const struct pi_transcoder * tc = use->tc;
    const int64_t d_model = tc->b_dec->ne[0];
    const int64_t d_tc    = tc->b_enc->ne[0];
    if (cur->ne[0] != d_model) {
        st->build_failed = "the transcoder's d_model is not the width of the tensor it reads";
        return;
    }
    const int64_t n = ggml_nelements(cur) / d_model;
    use->x = ggml_reshape_2d(ctx, ggml_is_contiguous(cur) ? cur : ggml_cont(ctx, cur), d_model, n);
    struct ggml_tensor * pre = ggml_add(ctx, ggml_mul_mat(ctx, tc->w_enc_t, use->x), tc->b_enc); // [d_tc, n]
    use->f = pi_sparse_activate(ctx, tc->activation, pre, tc->threshold, tc->k);
    use->ids    = ggml_top_k(ctx, use->f, use->top_k);
    use->values = ggml_get_rows(ctx, ggml_reshape_3d(ctx, use->f, 1, d_tc, n), use->ids);
    pi_tc_output(gf, use->ids, "ids", use);
    pi_tc_output(gf, use->values, "values", use);
    pi_keep(st, cur, use->ids);
    pi_keep(st, cur, use->values);
    use->delta = use->n_edits > 0 ? pi_tc_delta(ctx, use, use->f) : NULL;
}

static struct ggml_tensor * pi_tc_sum(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b) {
    return a == NULL ? b : ggml_add(ctx, a, b);
}

// at the output out [d_model, n] of layer m = use's: what every transcoder writing to m writes, y from the
// features and dy from their edits; false (build_failed set) when one of them has no features in this build
static bool pi_tc_decode(struct pi_state * st, struct ggml_context * ctx, const struct pi_tcs * self,
                         const struct pi_tc_use * use, int64_t n, struct ggml_tensor ** y, struct ggml_tensor ** dy) {
    const int32_t m = use->tc->il;
    *y = *dy = NULL;
    for (int32_t i = 0; i < self->n_uses; ++i) {
        const struct pi_tc_use * src = &self->uses[i];
        const struct pi_transcoder * tc = src->tc;
        if (tc->il > m || tc->il + tc->n_out <= m) {
            continue;
        }
        if (src->f == NULL || src->f->ne[1] != n) {
            st->build_failed = "a transcoder's features have another number of rows than the output it writes";
            return false;
        }
        struct ggml_tensor * dec = ggml_view_2d(ctx, tc->w_dec_t, tc->w_dec_t->ne[0], tc->w_dec_t->ne[1],
                                                tc->w_dec_t->nb[1], (m - tc->il) * tc->w_dec_t->nb[2]);
        *y = pi_tc_sum(ctx, *y, ggml_mul_mat(ctx, dec, src->f));
        if (src->delta != NULL) {
            *dy = pi_tc_sum(ctx, *dy, ggml_mul_mat(ctx, dec, src->delta));
        }
    }
    *y = ggml_add(ctx, *y, use->tc->b_dec);
    if (use->tc->w_skip_t != NULL) {
        *y = ggml_add(ctx, *y, ggml_mul_mat(ctx, use->tc->w_skip_t, use->x));
    }
    return true;
}

// at the output: the statistics, and the output as the mode makes it
static struct ggml_tensor * pi_tc_replace(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                          const struct pi_tcs * self, struct pi_tc_use * use, struct ggml_tensor * cur) {
    const int64_t d_model = use->tc->b_dec->ne[0];
    if (use->f == NULL || cur->ne[0] != d_model || ggml_nelements(cur) / d_model != use->f->ne[1]) {
        st->build_failed = "the transcoder's output tensor does not match its input (rows or width)";
        return cur;
    }
    const int64_t n = use->f->ne[1];
    struct ggml_tensor * out = ggml_reshape_2d(ctx, ggml_is_contiguous(cur) ? cur : ggml_cont(ctx, cur), d_model, n);
    struct ggml_tensor * y, * dy;
    if (!pi_tc_decode(st, ctx, self, use, n, &y, &dy)) {
        return cur;
    }
    struct ggml_tensor * err  = ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_sub(ctx, out, y)));
    struct ggml_tensor * norm = ggml_sum_rows(ctx, ggml_sqr(ctx, out));
    struct ggml_tensor * l0   = ggml_sum_rows(ctx, ggml_step(ctx, use->f));
    use->stats = ggml_concat(ctx, ggml_concat(ctx, err, norm, 0), l0, 0); // [3, n]
    pi_tc_output(gf, use->stats, "stats", use);
    pi_keep(st, cur, use->stats);

    struct ggml_tensor * base = use->mode == PI_TC_DROP_ERROR ? y : out;
    if (use->mode == PI_TC_ENCODE || (use->mode == PI_TC_KEEP_ERROR && dy == NULL)) {
        return cur;
    }
    struct ggml_tensor * res = dy != NULL ? ggml_add(ctx, base, dy) : base;
    res = ggml_reshape_4d(ctx, res, cur->ne[0], cur->ne[1], cur->ne[2], cur->ne[3]);
    ggml_format_name(res, "%s (transcoder)", cur->name);
    return res;
}

int pi_tc_read(struct pi_state * st, int32_t i, int32_t * ids, float * values, float * stats, int64_t n_rows) {
    const struct pi_tcs * self = pi_self(st, &pi_recipe_transcoder);
    if (i < 0 || i >= self->n_uses) {
        return pi_fail(st, "no such transcoder");
    }
    const struct pi_tc_use * use = &self->uses[i];
    if (use->ids == NULL || use->stats == NULL) {
        return pi_fail(st, "the transcoder's input or output tensor was not in the graph");
    }
    if (use->ids->ne[1] != n_rows) {
        return pi_fail(st, "the transcoder's tensor has another number of rows");
    }
    ggml_backend_tensor_get(use->ids, ids, 0, ggml_nbytes(use->ids));
    ggml_backend_tensor_get(use->values, values, 0, ggml_nbytes(use->values));
    ggml_backend_tensor_get(use->stats, stats, 0, ggml_nbytes(use->stats));
    return 0;
}

static void pi_tcs_begin(struct pi_state * st, void * data) {
    struct pi_tcs * self = data;
    for (int32_t i = 0; i < self->n_uses; ++i) {
        struct pi_tc_use * use = &self->uses[i];
        use->in_done = use->out_done = false;
        use->x = use->f = use->delta = NULL;
        use->ids = use->values = use->stats = NULL;
    }
}

// the first tensor of each name (llama names the FFN output and the residual sum after it "ffn_out")
static struct ggml_tensor * pi_tcs_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                          struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                          int32_t il) {
    struct pi_tcs * self = data;
    for (int32_t i = 0; i < self->n_uses; ++i) {
        struct pi_tc_use * use = &self->uses[i];
        if (use->tc->il != il) {
            continue;
        }
        const bool in  = !use->in_done && strcmp(use->in_name, name) == 0;
        const bool out = !in && !use->out_done && strcmp(use->out_name, name) == 0;
        if (!in && !out) {
            continue;
        }
        use->in_done  = use->in_done || in;
        use->out_done = use->out_done || out;
        if (!pi_room(gf, PI_ROOM + 4*self->n_uses)) {
            st->build_failed = PI_NO_ROOM;
        } else if (in) {
            pi_tc_encode(st, ctx, gf, use, cur);
        } else {
            cur = pi_tc_replace(st, ctx, gf, self, use, cur);
        }
    }
    return cur;
}

const struct pi_recipe pi_recipe_transcoder = {
    .name   = "transcoder",
    .size   = sizeof(struct pi_tcs),
    .clear  = pi_tcs_clear,
    .active = pi_tcs_active,
    .begin  = pi_tcs_begin,
    .tensor = pi_tcs_tensor,
};
