// pyinterp native layer: decoding a batch of sequences under the recipes, and reading what a graph output holds.

#include "internal.h"

#include <limits.h>

int32_t pi_decode(struct pi_state * st, const llama_token * tokens, int32_t n_seq, const int32_t * n_tokens,
                  const int32_t * pos0, const int32_t * seq_ids, bool all_logits) {
    // llama_decode asserts on these; answer with an error instead
    int64_t n = 0;
    for (int32_t s = 0; s < n_seq; ++s) {
        if (n_tokens[s] < 1 || pos0[s] < 0 || pos0[s] + n_tokens[s] > (int32_t) llama_n_ctx(st->ctx)) {
            pi_fail(st, "batch does not fit the context");
            return -100;
        }
        if (seq_ids[s] < 0 || seq_ids[s] >= (int32_t) llama_n_seq_max(st->ctx)) {
            pi_fail(st, "sequence id out of range");
            return -100;
        }
        n += n_tokens[s];
    }
    if (n_seq < 1 || n > (int64_t) llama_n_batch(st->ctx)) {
        pi_fail(st, "batch does not fit the context");
        return -100;
    }
    st->n_ubatch  = (int32_t) n;
    st->n_outputs = all_logits ? st->n_ubatch : n_seq;
    const struct pi_batch seqs = { n_seq, n_tokens, pos0, seq_ids, all_logits };
    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        if (pi_recipes[i]->prepare != NULL && pi_recipes[i]->prepare(st, st->self[i], &seqs) != 0) {
            return -100;
        }
    }
    st->n_nodes = INT_MAX; // the next hook call, if llama.cpp builds a graph, begins a build

    struct llama_batch batch = llama_batch_init((int32_t) n, 0, 1);
    int32_t j = 0;
    for (int32_t s = 0; s < n_seq; ++s) {
        for (int32_t i = 0; i < n_tokens[s]; ++i, ++j) {
            batch.token[j]     = tokens[j];
            batch.pos[j]       = pos0[s] + i;
            batch.n_seq_id[j]  = 1;
            batch.seq_id[j][0] = seq_ids[s];
            batch.logits[j]    = all_logits || i == n_tokens[s] - 1;
        }
    }
    batch.n_tokens = (int32_t) n;

    const int32_t ret = llama_decode(st->ctx, batch);
    llama_batch_free(batch);
    if (ret == 0) {
        llama_synchronize(st->ctx);
    }
    if (ret == 0 && st->build_failed) {
        pi_fail(st, st->build_failed);
        return -101;
    }
    return ret;
}

int32_t pi_n_builds(const struct pi_state * st) {
    return st->n_builds;
}

// copy the graph output t to dst (room for n_dst floats) as float32, keeping the first n0 of ne[0] elements of
// every row
int pi_read_f32(struct pi_state * st, const struct ggml_tensor * t, float * dst, int64_t n_dst, int64_t n0) {
    if (n0 <= 0 || n0 > t->ne[0]) {
        return pi_fail(st, "bad row length");
    }
    if (ggml_nrows(t)*n0 != n_dst) {
        return pi_fail(st, "destination size does not match the captured tensor");
    }
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) {
        return pi_fail(st, "captured tensor is neither F32 nor F16");
    }
    if (t->type == GGML_TYPE_F32 && n0 == t->ne[0]) {
        ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
        return 0;
    }
    // one copy from the device, then drop the padding of every row on the host
    const int64_t nrows    = ggml_nrows(t);
    const size_t  row_size = ggml_row_size(t->type, t->ne[0]);
    char * buf = malloc(ggml_nbytes(t));
    ggml_backend_tensor_get(t, buf, 0, ggml_nbytes(t));
    for (int64_t r = 0; r < nrows; ++r) {
        const char * row = buf + r*row_size;
        float * out = dst + r*n0;
        if (t->type == GGML_TYPE_F32) {
            memcpy(out, row, n0*sizeof(float));
        } else {
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) row, out, n0);
        }
    }
    free(buf);
    return 0;
}
