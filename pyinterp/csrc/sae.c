// pyinterp native layer: sparse autoencoders encoding a tensor inside the graph (SAELens's equations),
// with sparse feature outputs, reconstruction statistics and feature edits that keep the error term.

#include "internal.h"

struct pi_sae {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor * w_enc_t;   // [d_in, d_sae] ggml: one row of d_in per feature
    struct ggml_tensor * b_enc;     // [d_sae]
    struct ggml_tensor * w_dec;     // [d_in, d_sae]: one decoder row per feature
    struct ggml_tensor * w_dec_t;   // [d_sae, d_in]
    struct ggml_tensor * b_dec;     // [d_in]
    struct ggml_tensor * threshold; // [d_sae] (JumpReLU)
    int32_t activation;
    int32_t k;
    bool    apply_b_dec;
};

// one SAE encoding a tensor in this plan
struct pi_sae_use {
    struct pi_sae * sae;
    char    name[PI_NAME_MAX];
    int32_t il;
    int32_t top_k;
    int32_t n_edits;
    bool    edit_scale;
    struct ggml_context * ctx;      // owns edit_ids, edit_values
    ggml_backend_buffer_t buf;
    struct ggml_tensor * edit_ids;    // [n_edits] I32
    struct ggml_tensor * edit_values; // [1, n_edits] F32
    bool done;
    struct ggml_tensor * ids;       // [top_k, n_rows] I32 of the last build
    struct ggml_tensor * values;    // [1, top_k, n_rows]
    struct ggml_tensor * stats;     // [5, n_rows]
};

struct pi_saes {
    struct pi_sae_use * uses;
    int32_t n_uses;
};

extern const struct pi_recipe pi_recipe_sae;

struct pi_sae * pi_sae_load(struct pi_state * st, int32_t il, int32_t d_in, int32_t d_sae, const float * w_enc_t,
                            const float * b_enc, const float * w_dec, const float * w_dec_t, const float * b_dec,
                            const float * threshold, int32_t activation, int32_t k, bool apply_b_dec) {
    if (il < -1 || il >= st->n_layer || d_in < 1 || d_sae < 1 || activation < PI_SAE_RELU || activation > PI_SAE_TOPK ||
        (activation == PI_SAE_TOPK && (k < 1 || k > d_sae)) || (activation == PI_SAE_JUMPRELU && threshold == NULL)) {
        pi_fail(st, "bad SAE shape, activation or k");
        return NULL;
    }
    struct pi_sae * sae = calloc(1, sizeof(struct pi_sae));
    struct ggml_init_params params = { 6*ggml_tensor_overhead(), NULL, true };
    sae->ctx = ggml_init(params);
    sae->w_enc_t   = ggml_new_tensor_2d(sae->ctx, GGML_TYPE_F32, d_in, d_sae);
    sae->b_enc     = ggml_new_tensor_1d(sae->ctx, GGML_TYPE_F32, d_sae);
    sae->w_dec     = ggml_new_tensor_2d(sae->ctx, GGML_TYPE_F32, d_in, d_sae);
    sae->w_dec_t   = ggml_new_tensor_2d(sae->ctx, GGML_TYPE_F32, d_sae, d_in);
    sae->b_dec     = ggml_new_tensor_1d(sae->ctx, GGML_TYPE_F32, d_in);
    sae->threshold = ggml_new_tensor_1d(sae->ctx, GGML_TYPE_F32, d_sae);
    struct ggml_tensor * tensors[] = { sae->w_enc_t, sae->b_enc, sae->w_dec, sae->w_dec_t, sae->b_dec, sae->threshold };
    const void * data[] = { w_enc_t, b_enc, w_dec, w_dec_t, b_dec, threshold };
    sae->buf = pi_alloc_upload(sae->ctx, pi_layer_buft(st, il), tensors, data, 6);
    if (sae->buf == NULL) {
        ggml_free(sae->ctx);
        free(sae);
        pi_fail(st, "could not allocate device memory for the SAE");
        return NULL;
    }
    sae->activation  = activation;
    sae->k           = k;
    sae->apply_b_dec = apply_b_dec;
    return sae;
}

void pi_sae_free(struct pi_sae * sae) {
    if (sae != NULL) {
        ggml_backend_buffer_free(sae->buf);
        ggml_free(sae->ctx);
        free(sae);
    }
}

static void pi_saes_clear(struct pi_state * st, void * data) {
    struct pi_saes * self = data;
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

static bool pi_saes_active(const struct pi_state * st, const void * data) {
    const struct pi_saes * self = data;
    return self->n_uses > 0;
}

int32_t pi_sae_attach(struct pi_state * st, struct pi_sae * sae, const char * name, int32_t il, int32_t top_k,
                      const int32_t * edit_ids, const float * edit_values, int32_t n_edits, bool edit_scale) {
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    const int64_t d_sae = sae->b_enc->ne[0];
    if (top_k < 1 || top_k > d_sae || il < -1 || il >= st->n_layer) {
        return pi_fail(st, "top_k or layer out of range");
    }
    for (int32_t i = 0; i < n_edits; ++i) {
        if (edit_ids[i] < 0 || edit_ids[i] >= d_sae) {
            return pi_fail(st, "edited feature out of range");
        }
    }
    struct pi_sae_use use = {0};
    use.sae = sae;
    snprintf(use.name, sizeof(use.name), "%s", name);
    use.il         = il;
    use.top_k      = top_k;
    use.n_edits    = n_edits;
    use.edit_scale = edit_scale;
    if (n_edits > 0) {
        struct ggml_init_params params = { 2*ggml_tensor_overhead(), NULL, true };
        use.ctx = ggml_init(params);
        use.edit_ids    = ggml_new_tensor_1d(use.ctx, GGML_TYPE_I32, n_edits);
        use.edit_values = ggml_new_tensor_2d(use.ctx, GGML_TYPE_F32, 1, n_edits);
        use.buf = ggml_backend_alloc_ctx_tensors_from_buft(use.ctx, pi_layer_buft(st, il));
        if (use.buf == NULL) {
            ggml_free(use.ctx);
            return pi_fail(st, "could not allocate the SAE edits");
        }
        ggml_backend_tensor_set(use.edit_ids, edit_ids, 0, ggml_nbytes(use.edit_ids));
        ggml_backend_tensor_set(use.edit_values, edit_values, 0, ggml_nbytes(use.edit_values));
    }
    struct pi_saes * self = pi_self(st, &pi_recipe_sae);
    self->uses = realloc(self->uses, (self->n_uses + 1) * sizeof(struct pi_sae_use));
    self->uses[self->n_uses++] = use;
    pi_update_hook(st);
    pi_drop_graph(st);
    return self->n_uses - 1;
}

static void pi_sae_output(struct ggml_cgraph * gf, struct ggml_tensor * t, const char * what, const struct pi_sae_use * use) {
    ggml_format_name(t, "sae %s %s-%d", what, use->name, use->il);
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
}

static struct ggml_tensor * pi_sae_apply(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                  struct pi_sae_use * use, struct ggml_tensor * cur) {
    const struct pi_sae * sae = use->sae;
    const int64_t d_in  = sae->b_dec->ne[0];
    const int64_t d_sae = sae->b_enc->ne[0];
    if (ggml_nelements(cur) % d_in != 0) {
        st->build_failed = "the SAE's d_in does not divide the tensor it encodes";
        return cur;
    }
    const int64_t n = ggml_nelements(cur) / d_in;
    struct ggml_tensor * x = ggml_reshape_2d(ctx, ggml_is_contiguous(cur) ? cur : ggml_cont(ctx, cur), d_in, n);
    struct ggml_tensor * in  = sae->apply_b_dec ? ggml_sub(ctx, x, sae->b_dec) : x;
    struct ggml_tensor * pre = ggml_add(ctx, ggml_mul_mat(ctx, sae->w_enc_t, in), sae->b_enc); // [d_sae, n]
    struct ggml_tensor * f   = pi_sparse_activate(ctx, sae->activation, pre, sae->threshold, sae->k);

    use->ids    = ggml_top_k(ctx, f, use->top_k);
    use->values = ggml_get_rows(ctx, ggml_reshape_3d(ctx, f, 1, d_sae, n), use->ids);
    pi_sae_output(gf, use->ids, "ids", use);
    pi_sae_output(gf, use->values, "values", use);

    struct ggml_tensor * x_hat = ggml_add(ctx, ggml_mul_mat(ctx, sae->w_dec_t, f), sae->b_dec); // [d_in, n]
    struct ggml_tensor * err   = ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_sub(ctx, x, x_hat)));
    struct ggml_tensor * norm  = ggml_sum_rows(ctx, ggml_sqr(ctx, x));
    struct ggml_tensor * dot   = ggml_sum_rows(ctx, ggml_mul(ctx, x, x_hat));
    struct ggml_tensor * norm_hat = ggml_sum_rows(ctx, ggml_sqr(ctx, x_hat));
    struct ggml_tensor * l0 = ggml_sum_rows(ctx, ggml_step(ctx, f));
    use->stats = ggml_concat(ctx, ggml_concat(ctx, ggml_concat(ctx, err, norm, 0), ggml_concat(ctx, dot, norm_hat, 0), 0), l0, 0); // [5, n]
    pi_sae_output(gf, use->stats, "stats", use);
    pi_keep(st, cur, use->ids);
    pi_keep(st, cur, use->values);
    pi_keep(st, cur, use->stats);

    if (use->n_edits == 0) {
        return cur;
    }
    // the edited features' change, [n, n_edits], through their decoder rows
    struct ggml_tensor * fe = ggml_get_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, f)), use->edit_ids);
    struct ggml_tensor * values = ggml_reshape_2d(ctx, use->edit_values, 1, use->n_edits);
    struct ggml_tensor * delta = use->edit_scale ? ggml_mul(ctx, fe, ggml_scale_bias(ctx, values, 1.0f, -1.0f))
                                                 : ggml_scale(ctx, ggml_sub(ctx, fe, values), -1.0f);
    struct ggml_tensor * rows = ggml_cont(ctx, ggml_transpose(ctx, ggml_get_rows(ctx, sae->w_dec, use->edit_ids))); // [n_edits, d_in]
    struct ggml_tensor * dx = ggml_mul_mat(ctx, rows, ggml_cont(ctx, ggml_transpose(ctx, delta)));              // [d_in, n]
    struct ggml_tensor * out = ggml_add(ctx, x, dx);
    out = ggml_reshape_4d(ctx, out, cur->ne[0], cur->ne[1], cur->ne[2], cur->ne[3]);
    ggml_format_name(out, "%s (sae edit)", cur->name);
    return out;
}

// SAE i's output of the last decode: ids and values [n_rows, top_k] (the top_k features of each row, unordered)
// and stats [n_rows, 5] (|x - x_hat|^2, |x|^2, x.x_hat, |x_hat|^2, active features)
int pi_sae_read(struct pi_state * st, int32_t i, int32_t * ids, float * values, float * stats, int64_t n_rows) {
    const struct pi_saes * self = pi_self(st, &pi_recipe_sae);
    if (i < 0 || i >= self->n_uses) {
        return pi_fail(st, "no such SAE");
    }
    const struct pi_sae_use * use = &self->uses[i];
    if (use->ids == NULL) {
        return pi_fail(st, "the SAE's tensor was not in the graph");
    }
    if (use->ids->ne[1] != n_rows) {
        return pi_fail(st, "the SAE's tensor has another number of rows");
    }
    ggml_backend_tensor_get(use->ids, ids, 0, ggml_nbytes(use->ids));
    ggml_backend_tensor_get(use->values, values, 0, ggml_nbytes(use->values));
    ggml_backend_tensor_get(use->stats, stats, 0, ggml_nbytes(use->stats));
    return 0;
}

static void pi_saes_begin(struct pi_state * st, void * data) {
    struct pi_saes * self = data;
    for (int32_t i = 0; i < self->n_uses; ++i) {
        self->uses[i].done   = false;
        self->uses[i].ids    = NULL;
        self->uses[i].values = NULL;
        self->uses[i].stats  = NULL;
    }
}

// the SAEs attached to (name, il), in the order they were attached
static struct ggml_tensor * pi_saes_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                           struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                           int32_t il) {
    struct pi_saes * self = data;
    for (int32_t i = 0; i < self->n_uses; ++i) {
        struct pi_sae_use * use = &self->uses[i];
        if (use->done || use->il != il || strcmp(use->name, name) != 0) {
            continue;
        }
        use->done = true;
        if (!pi_room(gf, PI_ROOM)) {
            st->build_failed = PI_NO_ROOM;
            continue;
        }
        cur = pi_sae_apply(st, ctx, gf, use, cur);
    }
    return cur;
}

const struct pi_recipe pi_recipe_sae = {
    .name   = "sae",
    .size   = sizeof(struct pi_saes),
    .clear  = pi_saes_clear,
    .active = pi_saes_active,
    .begin  = pi_saes_begin,
    .tensor = pi_saes_tensor,
};
