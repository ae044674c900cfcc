// pyinterp native layer: the logit lens, built at the unembedding: recorded layers go through the model's
// own final norm and unembedding, reduced to the top-k tokens and to chosen targets' statistics in the graph.

#include "internal.h"

const char * PI_NO_ROOM = "the graph llama.cpp allocated has no room for this on every layer";

// the graph llama.cpp allocated (for its own nodes) has room for another PI_ROOM
bool pi_room(struct ggml_cgraph * gf) {
    return ggml_graph_size(gf) - ggml_graph_n_nodes(gf) >= PI_ROOM;
}

int pi_set_lens(struct pi_state * st, const char * name, bool norm, int32_t k) {
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    if (k < 1 || k > llama_vocab_n_tokens(llama_model_get_vocab(st->model))) {
        return pi_fail(st, "top-k out of range");
    }
    snprintf(st->lens.name, sizeof(st->lens.name), "%s", name);
    st->lens.norm = norm;
    st->lens.k    = k;
    pi_update_hook(st);
    pi_drop_graph(st);
    return 0;
}

void pi_lens_targets_free(struct pi_state * st) {
    if (st->lens.buf) {
        ggml_backend_buffer_free(st->lens.buf);
        ggml_free(st->lens.ctx);
    }
    st->lens.buf       = NULL;
    st->lens.ctx       = NULL;
    st->lens.targets   = NULL;
    st->lens.positions = NULL;
    st->lens.n_targets = 0;
}

// with the lens (pi_set_lens first): also the logit, probability and rank of these tokens at every layer, at the
// token positions `positions` (rows of the prompt)
int pi_set_lens_targets(struct pi_state * st, const int32_t * targets, int32_t n_targets, const int32_t * positions,
                        int32_t n_positions) {
    pi_lens_targets_free(st);
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
    st->lens.ctx       = ggml_init(params);
    st->lens.targets   = ggml_new_tensor_2d(st->lens.ctx, GGML_TYPE_I32, n_targets, n_positions);
    st->lens.positions = ggml_new_tensor_1d(st->lens.ctx, GGML_TYPE_I32, n_positions);
    ggml_set_name(st->lens.targets, "pi_lens_targets");
    ggml_set_name(st->lens.positions, "pi_lens_positions");
    st->lens.buf = ggml_backend_alloc_ctx_tensors_from_buft(st->lens.ctx, pi_layer_buft(st, -1));
    if (st->lens.buf == NULL) {
        ggml_free(st->lens.ctx);
        st->lens.ctx = NULL;
        return pi_fail(st, "could not allocate the lens targets");
    }
    int32_t * ids = malloc((size_t) n_targets * n_positions * sizeof(int32_t));
    for (int32_t p = 0; p < n_positions; ++p) {
        memcpy(ids + (size_t) p * n_targets, targets, n_targets * sizeof(int32_t));
    }
    ggml_backend_tensor_set(st->lens.targets, ids, 0, ggml_nbytes(st->lens.targets));
    ggml_backend_tensor_set(st->lens.positions, positions, 0, ggml_nbytes(st->lens.positions));
    free(ids);
    st->lens.n_targets    = n_targets;
    st->lens.max_position = max_position;
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

// the unembedding matrix product under result_output (after it may come soft-capping)
struct ggml_tensor * pi_unembedding(struct ggml_tensor * out) {
    while (out != NULL && out->op != GGML_OP_MUL_MAT) {
        out = out->src[0];
    }
    return out;
}

// the logit, probability and rank of the lens targets at the lens positions, from `logits` and `probs` [n_vocab,
// n_tokens]: [3, n_targets, n_positions]; rank = how many logits of the row are greater than the target's
static struct ggml_tensor * pi_target_stats(struct pi_state * st, struct ggml_context * ctx, struct ggml_tensor * logits,
                                            struct ggml_tensor * probs) {
    struct ggml_tensor * idx = st->lens.targets;    // [n_targets, n_positions]
    const int64_t n_vocab = logits->ne[0];
    const int64_t n_targets = idx->ne[0];
    const int64_t n_pos = idx->ne[1];
    struct ggml_tensor * l = ggml_get_rows(ctx, logits, st->lens.positions); // [n_vocab, n_positions]
    struct ggml_tensor * p = ggml_get_rows(ctx, probs, st->lens.positions);
    struct ggml_tensor * tl = ggml_get_rows(ctx, ggml_reshape_3d(ctx, l, 1, n_vocab, n_pos), idx); // [1, n_targets, n_positions]
    struct ggml_tensor * tp = ggml_get_rows(ctx, ggml_reshape_3d(ctx, p, 1, n_vocab, n_pos), idx);
    struct ggml_tensor * every = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, l, n_vocab, 1, n_pos), n_vocab, n_targets, n_pos, 1);
    struct ggml_tensor * rank = ggml_sum_rows(ctx, ggml_step(ctx, ggml_sub(ctx, every, tl))); // [1, n_targets, n_positions]
    return ggml_concat(ctx, ggml_concat(ctx, tl, tp, 0), rank, 0);
}

// at result_output: unembed every recorded layer the way the model unembeds its last layer
void pi_build_lens(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                          struct ggml_tensor * out) {
    struct pi_lens * lens = &st->lens;
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
        if (!pi_room(gf)) {
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
            struct ggml_tensor * stats = pi_target_stats(st, ctx, logits, probs);
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
    if (st->lens.failed) {
        return pi_fail(st, st->lens.failed);
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    const struct ggml_tensor * t_ids = st->lens.ids[il + 1];
    if (t_ids == NULL) {
        return 1;
    }
    if (ggml_nelements(t_ids) != n) {
        return pi_fail(st, "destination size does not match the lens");
    }
    ggml_backend_tensor_get(t_ids, ids, 0, ggml_nbytes(t_ids));
    ggml_backend_tensor_get(st->lens.probs[il + 1], probs, 0, ggml_nbytes(st->lens.probs[il + 1]));
    return 0;
}

// the lens targets' statistics at layer il (-1: the tensor outside the layers) after the last decode: n =
// n_positions*n_targets*3 floats, position-major, then target, then (logit, probability, rank = how many logits
// are greater); returns 1 when the layer had no such tensor
int pi_lens_targets_read(struct pi_state * st, int32_t il, float * dst, int64_t n) {
    if (st->lens.failed) {
        return pi_fail(st, st->lens.failed);
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    const struct ggml_tensor * t = st->lens.stats[il + 1];
    if (t == NULL) {
        return st->lens.ids[il + 1] == NULL ? 1 : pi_fail(st, "no lens targets were set, or a position is past the prompt");
    }
    if (ggml_nelements(t) != n) {
        return pi_fail(st, "destination size does not match the lens targets");
    }
    ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
    return 0;
}

