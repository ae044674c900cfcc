// pyinterp native layer: the logit lens, built at the unembedding: recorded layers go through the model's
// own final norm and unembedding, reduced to the top-k tokens and to chosen targets' statistics in the graph.

#include "internal.h"

// every layer's `name` tensor through the model's final norm (or not) and unembedding, reduced to the top-k
// probabilities per token inside the graph, and to the logit, log-probability and rank of chosen target tokens
struct pi_lens {
    char  name[PI_NAME_MAX];
    bool  norm;
    int32_t k;                      // active when k > 0
    // per slot il+1: slot 0 is the tensor outside the layers (the embedding), slot il+1 layer il
    struct ggml_tensor ** in;       // [n_layer+1] the tensor to unembed
    struct ggml_tensor ** ids;      // [n_layer+1] [k, n_tokens] I32, top-k token ids (unordered)
    struct ggml_tensor ** probs;    // [n_layer+1] [1, k, n_tokens] F32, their probabilities
    struct ggml_tensor ** stats;    // [n_layer+1] [3, n_targets, n_positions] F32: each target's logit, probability, rank
    const char * failed;            // why the lens could not be built (NULL: it was)
    int32_t n_targets;              // 0: no target statistics
    int32_t max_position;           // the last of the positions
    struct ggml_context * ctx;      // owns targets and positions
    ggml_backend_buffer_t buf;      // on the output device
    struct ggml_tensor * targets;   // [n_targets, n_positions] I32: the target ids, repeated for every position
    struct ggml_tensor * positions; // [n_positions] I32: the tokens (rows) the statistics are computed at
};

extern const struct pi_recipe pi_recipe_lens;

int pi_set_lens(struct pi_state * st, const char * name, bool norm, int32_t k) {
    struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    if (k < 1 || k > llama_vocab_n_tokens(llama_model_get_vocab(st->model))) {
        return pi_fail(st, "top-k out of range");
    }
    snprintf(lens->name, sizeof(lens->name), "%s", name);
    lens->norm = norm;
    lens->k    = k;
    pi_update_hook(st);
    pi_drop_graph(st);
    return 0;
}

static void pi_lens_targets_free(struct pi_lens * lens) {
    if (lens->buf) {
        ggml_backend_buffer_free(lens->buf);
        ggml_free(lens->ctx);
    }
    lens->buf       = NULL;
    lens->ctx       = NULL;
    lens->targets   = NULL;
    lens->positions = NULL;
    lens->n_targets = 0;
}

// with the lens (pi_set_lens first): also the logit, probability and rank of these tokens at every layer, at the
// token positions `positions` (rows of the prompt)
int pi_set_lens_targets(struct pi_state * st, const int32_t * targets, int32_t n_targets, const int32_t * positions,
                        int32_t n_positions) {
    struct pi_lens * lens = pi_self(st, &pi_recipe_lens);
    pi_lens_targets_free(lens);
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(st->model));
    if (n_targets < 1 || n_positions < 1) {
        return pi_fail(st, "no target tokens or no positions");
    }
    for (int32_t j = 0; j < n_targets; ++j) {
        if (targets[j] < 0 || targets[j] >= n_vocab) {
            return pi_fail(st, "target token id out of range");
        }
    }
    int32_t max_position = 0;
    for (int32_t p = 0; p < n_positions; ++p) {
        if (positions[p] < 0 || positions[p] >= (int32_t) llama_n_batch(st->ctx)) {
            return pi_fail(st, "position out of range");
        }
        max_position = positions[p] > max_position ? positions[p] : max_position;
    }
    struct ggml_init_params params = { 2*ggml_tensor_overhead(), NULL, true };
    lens->ctx       = ggml_init(params);
    lens->targets   = ggml_new_tensor_2d(lens->ctx, GGML_TYPE_I32, n_targets, n_positions);
    lens->positions = ggml_new_tensor_1d(lens->ctx, GGML_TYPE_I32, n_positions);
    ggml_set_name(lens->targets, "pi_lens_targets");
    ggml_set_name(lens->positions, "pi_lens_positions");
    lens->buf = ggml_backend_alloc_ctx_tensors_from_buft(lens->ctx, pi_layer_buft(st, -1));
    if (lens->buf == NULL) {
        ggml_free(lens->ctx);
        lens->ctx = NULL;
        return pi_fail(st, "could not allocate the lens targets");
    }
    int32_t * ids = malloc((size_t) n_targets * n_positions * sizeof(int32_t));
    for (int32_t p = 0; p < n_positions; ++p) {
        memcpy(ids + (size_t) p * n_targets, targets, n_targets * sizeof(int32_t));
    }
    ggml_backend_tensor_set(lens->targets, ids, 0, ggml_nbytes(lens->targets));
    ggml_backend_tensor_set(lens->positions, positions, 0, ggml_nbytes(lens->positions));
    free(ids);
    lens->n_targets    = n_targets;
    lens->max_position = max_position;
    pi_drop_graph(st);
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

// the logit, probability and rank of the lens targets at the lens positions, from `logits` and `probs` [n_vocab,
// n_tokens]: [3, n_targets, n_positions]; rank = how many logits of the row are greater than the target's
static struct ggml_tensor * pi_target_stats(const struct pi_lens * lens, struct ggml_context * ctx, struct ggml_tensor * logits,
                                            struct ggml_tensor * probs) {
    struct ggml_tensor * idx = lens->targets;    // [n_targets, n_positions]
    const int64_t n_vocab = logits->ne[0];
    const int64_t n_targets = idx->ne[0];
    const int64_t n_pos = idx->ne[1];
    struct ggml_tensor * l = ggml_get_rows(ctx, logits, lens->positions); // [n_vocab, n_positions]
    struct ggml_tensor * p = ggml_get_rows(ctx, probs, lens->positions);
    struct ggml_tensor * tl = ggml_get_rows(ctx, ggml_reshape_3d(ctx, l, 1, n_vocab, n_pos), idx); // [1, n_targets, n_positions]
    struct ggml_tensor * tp = ggml_get_rows(ctx, ggml_reshape_3d(ctx, p, 1, n_vocab, n_pos), idx);
    struct ggml_tensor * every = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, l, n_vocab, 1, n_pos), n_vocab, n_targets, n_pos, 1);
    struct ggml_tensor * rank = ggml_sum_rows(ctx, ggml_step(ctx, ggml_sub(ctx, every, tl))); // [1, n_targets, n_positions]
    return ggml_concat(ctx, ggml_concat(ctx, tl, tp, 0), rank, 0);
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
        if (!pi_room(gf, PI_ROOM)) {
            lens->failed = PI_NO_ROOM;
            return;
        }
        struct ggml_tensor * logits = pi_replay(ctx, out, from, x);
        if (logits == NULL) {
            lens->failed = "the model's unembedding uses an op the logit lens cannot replay";
            return;
        }
        struct ggml_tensor * probs = ggml_soft_max(ctx, logits);
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
        if (lens->n_targets > 0 && lens->max_position < logits->ne[1]) {
            struct ggml_tensor * stats = pi_target_stats(lens, ctx, logits, probs);
            ggml_format_name(stats, "lens_targets-%d", slot - 1);
            ggml_set_output(stats);
            ggml_build_forward_expand(gf, stats);
            lens->stats[slot] = stats;
        }
    }
}

// top-k of the logit lens at layer il (-1: the tensor outside the layers, e.g. the embedding) after the last
// decode: ids and probs hold n = k*n_tokens values, token-major, unordered within a token; returns 1 when the
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
// n_positions*n_targets*3 floats, position-major, then target, then (logit, probability, rank = how many logits
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
        return lens->ids[il + 1] == NULL ? 1 : pi_fail(st, "no lens targets were set, or a position is past the prompt");
    }
    if (ggml_nelements(t) != n) {
        return pi_fail(st, "destination size does not match the lens targets");
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
    return true;
}

static void pi_lens_clear(struct pi_state * st, void * data) {
    struct pi_lens * lens = data;
    lens->k = 0;
    pi_lens_targets_free(lens);
}

static void pi_lens_release(struct pi_state * st, void * data) {
    struct pi_lens * lens = data;
    free(lens->in);
    free(lens->ids);
    free(lens->probs);
    free(lens->stats);
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
