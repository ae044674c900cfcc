// pyinterp native layer: the logit lens, built at the unembedding: recorded layers go through the model's
// own final norm and unembedding, reduced to the top-k tokens and to chosen targets' statistics in the graph.

#include "internal.h"

#include <math.h>

// every layer's `name` tensor at chosen rows (token positions) through the model's final norm (or not) and
// unembedding, reduced to the top-k probabilities per row inside the graph, and to the logit, probability and rank
// of chosen target tokens; the rows are selected before the norm and the unembedding, so only they are computed
struct pi_lens {
    char  name[PI_NAME_MAX];
    bool  norm;
    int32_t k;                      // active when k > 0
    float temp;                     // the probabilities are the softmax of logits / temp
    bool with_entropy;              // also their entropy
    // per slot il+1: slot 0 is the tensor outside the layers (the embedding), slot il+1 layer il
    struct ggml_tensor ** in;       // [n_layer+1] the tensor to unembed
    struct ggml_tensor ** ids;      // [n_layer+1] [k, n_rows] I32, top-k token ids (unordered)
    struct ggml_tensor ** probs;    // [n_layer+1] [1, k, n_rows] F32, their probabilities
    struct ggml_tensor ** stats;    // [n_layer+1] [3, n_targets, n_rows] F32: each target's logit, probability, rank
    struct ggml_tensor ** entropy;  // [n_layer+1] [1, n_rows] F32: the entropy of the probabilities, in nats (with_entropy)
    const char * failed;            // why the lens could not be built (NULL: it was)
    int32_t max_row;                // the last of the rows
    int32_t max_out_row;            // the last of the output rows (-1: none given)
    struct ggml_context * ctx;      // owns rows
    ggml_backend_buffer_t buf;      // on the output device
    struct ggml_tensor * rows;      // [n_rows, 2] I32: the tokens (rows of the pass) the lens unembeds, then the
                                    // same tokens as rows of the outputs (a layer after the model keeps only the
                                    // rows whose logits are wanted: the last layer's later tensors)
    int32_t n_targets;              // 0: no target statistics
    struct ggml_context * tctx;     // owns targets
    ggml_backend_buffer_t tbuf;     // on the output device
    struct ggml_tensor * targets;   // [n_targets, n_rows] I32: the target ids, repeated for every row
};

extern const struct pi_recipe pi_recipe_lens;

// a device tensor of `n0` x `n1` int32 `values` named `name` in its own context and buffer (*ctx, *buf); NULL when
// it could not be allocated
static struct ggml_tensor * pi_lens_i32(struct pi_state * st, struct ggml_context ** ctx, ggml_backend_buffer_t * buf,
                                        const int32_t * values, int64_t n0, int64_t n1, const char * name) {
    struct ggml_init_params params = { ggml_tensor_overhead(), NULL, true };
    *ctx = ggml_init(params);
    struct ggml_tensor * t = ggml_new_tensor_2d(*ctx, GGML_TYPE_I32, n0, n1);
    ggml_set_name(t, name);
    *buf = ggml_backend_alloc_ctx_tensors_from_buft(*ctx, pi_layer_buft(st, -1));
    if (*buf == NULL) {
        ggml_free(*ctx);
        *ctx = NULL;
        return NULL;
    }
    ggml_backend_tensor_set(t, values, 0, ggml_nbytes(t));
    return t;
}

static void pi_lens_targets_free(struct pi_lens * lens) {
    if (lens->tbuf) {
        ggml_backend_buffer_free(lens->tbuf);
        ggml_free(lens->tctx);
    }
    lens->tbuf      = NULL;
    lens->tctx      = NULL;
    lens->targets   = NULL;
    lens->n_targets = 0;
}

static void pi_lens_rows_free(struct pi_lens * lens) {
    pi_lens_targets_free(lens);
    if (lens->buf) {
        ggml_backend_buffer_free(lens->buf);
        ggml_free(lens->ctx);
    }
    lens->buf  = NULL;
    lens->ctx  = NULL;
    lens->rows = NULL;
}

// the lens of tensor `name` (through the final norm or not), top-k per row of the probabilities at temperature
// `temp` (and their entropy, when `entropy`), at the rows (token positions of the pass) `rows`; `out_rows` (or
// NULL): the same tokens' indices among the pass's outputs, where a layer holds only those; drops the targets
int pi_set_lens(struct pi_state * st, const char * name, bool norm, int32_t k, float temp, bool entropy,
                const int32_t * rows, const int32_t * out_rows, int32_t n_rows) {
    struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    pi_lens_rows_free(lens);
    lens->k = 0;
    pi_update_hook(st);
    pi_drop_graph(st);
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    if (k < 1 || k > llama_vocab_n_tokens(llama_model_get_vocab(st->model))) {
        return pi_fail(st, "top-k out of range");
    }
    if (!(temp > 0.0f) || !isfinite(temp)) {
        return pi_fail(st, "the lens temperature must be a positive number");
    }
    if (n_rows < 1) {
        return pi_fail(st, "no lens rows");
    }
    int32_t max_row = 0;
    int32_t max_out_row = out_rows ? 0 : -1;
    int32_t * both = malloc(2 * (size_t) n_rows * sizeof(int32_t));
    for (int32_t r = 0; r < n_rows; ++r) {
        const int32_t o = out_rows ? out_rows[r] : 0;
        if (rows[r] < 0 || rows[r] >= (int32_t) llama_n_batch(st->ctx) || o < 0 || o > rows[r]) {
            free(both);
            return pi_fail(st, "position out of range");
        }
        max_row = rows[r] > max_row ? rows[r] : max_row;
        max_out_row = out_rows && o > max_out_row ? o : max_out_row;
        both[r] = rows[r];
        both[n_rows + r] = o;
    }
    lens->rows = pi_lens_i32(st, &lens->ctx, &lens->buf, both, n_rows, 2, "pi_lens_rows");
    free(both);
    if (lens->rows == NULL) {
        return pi_fail(st, "could not allocate the lens rows");
    }
    snprintf(lens->name, sizeof(lens->name), "%s", name);
    lens->norm    = norm;
    lens->k       = k;
    lens->temp    = temp;
    lens->with_entropy = entropy;
    lens->max_row = max_row;
    lens->max_out_row = max_out_row;
    pi_update_hook(st);
    return 0;
}

// with the lens (pi_set_lens first): also the logit, probability and rank of these tokens at every layer and row
int pi_set_lens_targets(struct pi_state * st, const int32_t * targets, int32_t n_targets) {
    struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    pi_lens_targets_free(lens);
    pi_drop_graph(st);
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(st->model));
    if (lens->rows == NULL) {
        return pi_fail(st, "lens targets need the lens (pi_set_lens first)");
    }
    if (n_targets < 1) {
        return pi_fail(st, "no target tokens");
    }
    for (int32_t j = 0; j < n_targets; ++j) {
        if (targets[j] < 0 || targets[j] >= n_vocab) {
            return pi_fail(st, "target token id out of range");
        }
    }
    const int64_t n_rows = lens->rows->ne[0];
    int32_t * ids = malloc((size_t) n_targets * n_rows * sizeof(int32_t));
    for (int64_t r = 0; r < n_rows; ++r) {
        memcpy(ids + (size_t) r * n_targets, targets, n_targets * sizeof(int32_t));
    }
    lens->targets = pi_lens_i32(st, &lens->tctx, &lens->tbuf, ids, n_targets, n_rows, "pi_lens_targets");
    free(ids);
    if (lens->targets == NULL) {
        return pi_fail(st, "could not allocate the lens targets");
    }
    lens->n_targets = n_targets;
    return 0;
}

// rebuild the ops from `from` up to `node` with `to` in place of `from` (the few ops a model's final
// norm and unembedding use); NULL for anything else
static struct ggml_tensor * pi_replay(struct ggml_context * ctx, struct ggml_tensor * node,
                                      struct ggml_tensor * from, struct ggml_tensor * to) {
    if (node == from) {
        return to;
    }
    const int follow = node->op == GGML_OP_MUL_MAT ? 1 : 0; // the activation side of the op
    struct ggml_tensor * x = node->src[follow] ? pi_replay(ctx, node->src[follow], from, to) : NULL;
    if (x == NULL) {
        return NULL;
    }
    float p0;
    float p1;
    memcpy(&p0, (const float *) node->op_params + 0, sizeof(float));
    memcpy(&p1, (const float *) node->op_params + 1, sizeof(float));
    switch (node->op) {
        case GGML_OP_RMS_NORM: return ggml_rms_norm(ctx, x, p0);
        case GGML_OP_NORM:     return ggml_norm(ctx, x, p0);
        case GGML_OP_MUL:      return ggml_mul(ctx, x, node->src[1]);
        case GGML_OP_ADD:      return ggml_add(ctx, x, node->src[1]);
        case GGML_OP_SCALE:    return ggml_scale_bias(ctx, x, p0, p1);
        case GGML_OP_MUL_MAT:  return ggml_mul_mat(ctx, node->src[0], x);
        case GGML_OP_UNARY:    return ggml_get_unary_op(node) == GGML_UNARY_OP_TANH ? ggml_tanh(ctx, x) : NULL;
        default:               return NULL;
    }
}

// the logit, probability and rank of the lens targets at every lensed row, from `logits` and `probs` [n_vocab,
// n_rows]: [3, n_targets, n_rows]; rank = how many logits of the row are greater than the target's
static struct ggml_tensor * pi_target_stats(const struct pi_lens * lens, struct ggml_context * ctx, struct ggml_tensor * logits,
                                            struct ggml_tensor * probs) {
    struct ggml_tensor * idx = lens->targets;    // [n_targets, n_rows]
    const int64_t n_vocab = logits->ne[0];
    const int64_t n_targets = idx->ne[0];
    const int64_t n_rows = idx->ne[1];
    struct ggml_tensor * tl = ggml_get_rows(ctx, ggml_reshape_3d(ctx, logits, 1, n_vocab, n_rows), idx); // [1, n_targets, n_rows]
    struct ggml_tensor * tp = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, n_vocab, n_rows), idx);
    struct ggml_tensor * every = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, logits, n_vocab, 1, n_rows), n_vocab, n_targets, n_rows, 1);
    struct ggml_tensor * rank = ggml_sum_rows(ctx, ggml_step(ctx, ggml_sub(ctx, every, tl))); // [1, n_targets, n_rows]
    return ggml_concat(ctx, ggml_concat(ctx, tl, tp, 0), rank, 0);
}

// one slot's lens: the rows `rows` of x through the ops from `from` to `out`, the top-k and the targets' statistics
// as graph outputs; false when the unembedding has an op the lens cannot replay
static bool pi_lens_slot(struct pi_lens * lens, int32_t slot, struct ggml_context * ctx, struct ggml_cgraph * gf,
                         struct ggml_tensor * out, struct ggml_tensor * from, struct ggml_tensor * x,
                         struct ggml_tensor * rows) {
    // the rows first: the norm, the unembedding and the softmax see only them
    struct ggml_tensor * logits = pi_replay(ctx, out, from, ggml_get_rows(ctx, x, rows));
    if (logits == NULL) {
        return false;
    }
    struct ggml_tensor * probs = ggml_soft_max_ext(ctx, logits, NULL, 1.0f / lens->temp, 0.0f);
    struct ggml_tensor * ids   = ggml_top_k(ctx, probs, lens->k);
    struct ggml_tensor * top   = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, probs->ne[0], probs->ne[1]), ids);
    ggml_format_name(ids, "lens_ids-%d", slot - 1);
    ggml_format_name(top, "lens_probs-%d", slot - 1);
    ggml_set_output(ids);
    ggml_set_output(top);
    ggml_build_forward_expand(gf, ids);
    ggml_build_forward_expand(gf, top);
    lens->ids[slot]   = ids;
    lens->probs[slot] = top;
    if (lens->with_entropy) {
        // -sum p log p; the probabilities below 1e-30 add less than 1e-28 each
        struct ggml_tensor * plogp = ggml_mul(ctx, probs, ggml_log(ctx, ggml_clamp(ctx, probs, 1e-30f, 1.0f)));
        struct ggml_tensor * entropy = ggml_scale(ctx, ggml_sum_rows(ctx, plogp), -1.0f);
        ggml_format_name(entropy, "lens_entropy-%d", slot - 1);
        ggml_set_output(entropy);
        ggml_build_forward_expand(gf, entropy);
        lens->entropy[slot] = entropy;
    }
    if (lens->n_targets > 0) {
        struct ggml_tensor * stats = pi_target_stats(lens, ctx, logits, probs);
        ggml_format_name(stats, "lens_targets-%d", slot - 1);
        ggml_set_output(stats);
        ggml_build_forward_expand(gf, stats);
        lens->stats[slot] = stats;
    }
    return true;
}

// at result_output: unembed every recorded layer the way the model unembeds its last layer
static void pi_lens_output(struct pi_state * st, void * data, struct ggml_context * ctx, struct ggml_cgraph * gf,
                           struct ggml_tensor * out) {
    struct pi_lens * lens = data;
    struct ggml_tensor * from = st->final_in;
    if (!lens->norm) {
        // the raw lens starts at the unembedding matrix product, after the final norm
        struct ggml_tensor * mm = pi_unembedding(out);
        from = mm ? mm->src[1] : NULL;
    }
    if (from == NULL) {
        lens->failed = "the model's unembedding uses an op the logit lens cannot replay";
        return;
    }
    for (int32_t slot = 0; slot <= st->n_layer; ++slot) {
        struct ggml_tensor * x = lens->in[slot];
        if (x == NULL || x->ne[0] != from->ne[0]) {
            continue;
        }
        // every token's row, or (the last layer's later tensors) only the outputs'
        const int64_t n_rows = lens->rows->ne[0];
        const bool outputs = x->ne[1] != st->n_ubatch;
        if (outputs ? x->ne[1] != st->n_outputs || lens->max_out_row < 0 || lens->max_out_row >= x->ne[1]
                    : lens->max_row >= x->ne[1]) {
            lens->failed = "a lens position is not among the rows the pass keeps on that layer";
            return;
        }
        if (!pi_room(gf, PI_ROOM)) {
            lens->failed = PI_NO_ROOM;
            return;
        }
        struct ggml_tensor * rows = ggml_view_1d(ctx, lens->rows, n_rows, outputs ? lens->rows->nb[1] : 0);
        if (!pi_lens_slot(lens, slot, ctx, gf, out, from, x, rows)) {
            lens->failed = "the model's unembedding uses an op the logit lens cannot replay";
            return;
        }
    }
}

// top-k of the logit lens at layer il (-1: the tensor outside the layers, e.g. the embedding) after the last
// decode: ids and probs hold n = k*n_rows values, row-major, unordered within a token; returns 1 when the
// layer had no such tensor
int pi_lens_read(struct pi_state * st, int32_t il, int32_t * ids, float * probs, int64_t n) {
    const struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    if (lens->failed) {
        return pi_fail(st, lens->failed);
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    const struct ggml_tensor * t_ids = lens->ids[il + 1];
    if (t_ids == NULL) {
        return 1;
    }
    if (ggml_nelements(t_ids) != n) {
        return pi_fail(st, "destination size does not match the lens");
    }
    ggml_backend_tensor_get(t_ids, ids, 0, ggml_nbytes(t_ids));
    ggml_backend_tensor_get(lens->probs[il + 1], probs, 0, ggml_nbytes(lens->probs[il + 1]));
    return 0;
}

// the lens targets' statistics at layer il (-1: the tensor outside the layers) after the last decode: n =
// n_rows*n_targets*3 floats, row-major, then target, then (logit, probability, rank = how many logits
// are greater); returns 1 when the layer had no such tensor
int pi_lens_targets_read(struct pi_state * st, int32_t il, float * dst, int64_t n) {
    const struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    if (lens->failed) {
        return pi_fail(st, lens->failed);
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    const struct ggml_tensor * t = lens->stats[il + 1];
    if (t == NULL) {
        return lens->ids[il + 1] == NULL ? 1 : pi_fail(st, "no lens targets were set");
    }
    if (ggml_nelements(t) != n) {
        return pi_fail(st, "destination size does not match the lens targets");
    }
    ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
    return 0;
}

// the entropy (nats) of the lens's probabilities at layer il (-1: the tensor outside the layers) after the last
// decode, n = n_rows floats; returns 1 when the layer had no such tensor
int pi_lens_entropy_read(struct pi_state * st, int32_t il, float * dst, int64_t n) {
    const struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    if (lens->failed) {
        return pi_fail(st, lens->failed);
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    const struct ggml_tensor * t = lens->entropy[il + 1];
    if (t == NULL) {
        return lens->ids[il + 1] == NULL ? 1 : pi_fail(st, "the lens was set without its entropy");
    }
    if (ggml_nelements(t) != n) {
        return pi_fail(st, "destination size does not match the lens entropy");
    }
    ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
    return 0;
}

static bool pi_lens_init(struct pi_state * st, void * data) {
    struct pi_lens * lens = data;
    lens->in    = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    lens->ids   = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    lens->probs = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    lens->stats = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    lens->entropy = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    return true;
}

static void pi_lens_clear(struct pi_state * st, void * data) {
    struct pi_lens * lens = data;
    lens->k = 0;
    pi_lens_rows_free(lens);
}

static void pi_lens_release(struct pi_state * st, void * data) {
    struct pi_lens * lens = data;
    free(lens->in);
    free(lens->ids);
    free(lens->probs);
    free(lens->stats);
    free(lens->entropy);
}

static bool pi_lens_active(const struct pi_state * st, const void * data) {
    const struct pi_lens * lens = data;
    return lens->k > 0;
}

static void pi_lens_begin(struct pi_state * st, void * data) {
    struct pi_lens * lens = data;
    for (int32_t slot = 0; slot <= st->n_layer; ++slot) {
        lens->in[slot]    = NULL;
        lens->ids[slot]   = NULL;
        lens->probs[slot] = NULL;
        lens->stats[slot] = NULL;
        lens->entropy[slot] = NULL;
    }
    lens->failed = NULL;
}

// note each layer's first tensor of the lens's name, as the interventions left it
static struct ggml_tensor * pi_lens_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                           struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                           int32_t il) {
    struct pi_lens * lens = data;
    if (lens->k > 0 && il >= -1 && il < st->n_layer && lens->in[il + 1] == NULL && strcmp(name, lens->name) == 0) {
        lens->in[il + 1] = cur;
    }
    return cur;
}

const struct pi_recipe pi_recipe_lens = {
    .name    = "lens",
    .size    = sizeof(struct pi_lens),
    .init    = pi_lens_init,
    .clear   = pi_lens_clear,
    .release = pi_lens_release,
    .active  = pi_lens_active,
    .begin   = pi_lens_begin,
    .tensor  = pi_lens_tensor,
    .output  = pi_lens_output,
};
