// pyinterp native layer: the op table. Every intervention and capture is a record here (what to do to
// which tensor of which layer, for which sequence and positions); the graph-build hook applies them with
// a few generic ggml recipes. The records' data lives in device memory kept across runs.

#include "internal.h"

void pi_ops_free(struct pi_state * st) {
    for (int32_t i = 0; i < st->n_ops; ++i) {
        struct pi_op * op = &st->ops[i];
        free(op->positions);
        free(op->host);
        free(op->rows.dst_host);
        free(op->rows.src_host);
        free(op->out_rows.dst_host);
        free(op->out_rows.src_host);
    }
    free(st->ops);
    st->ops          = NULL;
    st->n_ops        = 0;
    st->ops_uploaded = false;
    if (st->ops_ctx) {
        ggml_free(st->ops_ctx);
        st->ops_ctx = NULL;
    }
    if (st->rows_ctx) {
        ggml_free(st->rows_ctx);
        st->rows_ctx = NULL;
    }
}

int32_t pi_op_add(struct pi_state * st, int32_t kind, const char * name, int32_t il, int32_t seq,
                  const int32_t * positions, int32_t n_positions, const float * data, const int64_t * ne, bool per_row) {
    if (kind < PI_OP_CAPTURE || kind > PI_OP_INJECT) {
        return pi_fail(st, "unknown op kind");
    }
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    if (seq < -1 || seq >= (int32_t) llama_n_seq_max(st->ctx)) {
        return pi_fail(st, "sequence out of range");
    }
    if ((kind == PI_OP_CAPTURE) != (data == NULL)) {
        return pi_fail(st, kind == PI_OP_CAPTURE ? "a capture takes no data" : "this op needs data");
    }
    if (kind == PI_OP_SET && seq < 0 && positions == NULL) {
        return pi_fail(st, "a set op needs a sequence or positions");
    }
    if (kind == PI_OP_INJECT && (!per_row || seq >= 0 || positions != NULL)) {
        return pi_fail(st, "an inject op takes per-row data for every sequence and token");
    }
    if (per_row && (data == NULL || ne[2] != 1 || ne[3] != 1 || (positions != NULL && ne[1] != n_positions))) {
        return pi_fail(st, "per-row data must be [width, n_positions]");
    }
    st->ops = realloc(st->ops, (st->n_ops + 1) * sizeof(struct pi_op));
    struct pi_op * op = &st->ops[st->n_ops];
    memset(op, 0, sizeof(*op));
    op->kind = kind;
    snprintf(op->name, sizeof(op->name), "%s", name);
    op->il      = il;
    op->seq     = seq;
    op->per_row = per_row;
    op->buft    = pi_layer_buft(st, il);
    if (positions != NULL) {
        op->positions = malloc(n_positions * sizeof(int32_t));
        memcpy(op->positions, positions, n_positions * sizeof(int32_t));
        op->n_positions = n_positions;
    }
    if (data != NULL) {
        const int64_t n = ne[0] * ne[1] * ne[2] * ne[3];
        op->host = malloc(n * sizeof(float));
        memcpy(op->host, data, n * sizeof(float));
        memcpy(op->ne, ne, sizeof(op->ne));
    }
    st->ops_uploaded = false;
    st->n_ops += 1;
    pi_update_hook(st);
    return st->n_ops - 1;
}

// place `tensors` (of a no_alloc context) in the pools of their buffer types, growing a pool when it is too small
bool pi_pools_place(struct pi_state * st, struct pi_pool * pools, struct ggml_tensor ** tensors,
                    const ggml_backend_buffer_type_t * bufts, int32_t n) {
    (void) st;
    size_t need[PI_MAX_POOLS] = {0};
    for (int32_t i = 0; i < n; ++i) {
        int p = 0;
        while (p < PI_MAX_POOLS && pools[p].buft != NULL && pools[p].buft != bufts[i]) {
            ++p;
        }
        if (p == PI_MAX_POOLS) {
            return false;
        }
        pools[p].buft = bufts[i];
        const size_t align = ggml_backend_buft_get_alignment(bufts[i]);
        need[p] += GGML_PAD(ggml_backend_buft_get_alloc_size(bufts[i], tensors[i]), align);
    }
    struct ggml_tallocr talloc[PI_MAX_POOLS];
    for (int p = 0; p < PI_MAX_POOLS && pools[p].buft != NULL; ++p) {
        if (need[p] == 0) {
            continue;
        }
        need[p] += ggml_backend_buft_get_alignment(pools[p].buft);
        const size_t have = pools[p].buf ? ggml_backend_buffer_get_size(pools[p].buf) : 0;
        if (have < need[p]) {
            if (pools[p].buf) {
                ggml_backend_buffer_free(pools[p].buf);
            }
            pools[p].buf = ggml_backend_buft_alloc_buffer(pools[p].buft, need[p] > 2*have ? need[p] : 2*have);
            if (pools[p].buf == NULL) {
                return false;
            }
        }
        talloc[p] = ggml_tallocr_new(pools[p].buf);
    }
    for (int32_t i = 0; i < n; ++i) {
        int p = 0;
        while (pools[p].buft != bufts[i]) {
            ++p;
        }
        if (ggml_tallocr_alloc(&talloc[p], tensors[i]) != GGML_STATUS_SUCCESS) {
            return false;
        }
    }
    return true;
}

// the ops' data, to device memory (once per plan)
static int pi_ops_upload(struct pi_state * st) {
    if (st->ops_ctx) {
        ggml_free(st->ops_ctx);
    }
    struct ggml_init_params params = { (st->n_ops + 1) * ggml_tensor_overhead(), NULL, true };
    st->ops_ctx = ggml_init(params);
    struct ggml_tensor ** tensors = malloc((st->n_ops + 1) * sizeof(*tensors));
    ggml_backend_buffer_type_t * bufts = malloc((st->n_ops + 1) * sizeof(*bufts));
    int32_t n = 0;
    for (int32_t i = 0; i < st->n_ops; ++i) {
        struct pi_op * op = &st->ops[i];
        op->data = NULL;
        if (op->host == NULL) {
            continue;
        }
        op->data = ggml_new_tensor_4d(st->ops_ctx, GGML_TYPE_F32, op->ne[0], op->ne[1], op->ne[2], op->ne[3]);
        ggml_format_name(op->data, "pi_op_data-%d", i);
        tensors[n] = op->data;
        bufts[n++] = op->buft;
    }
    const bool placed = pi_pools_place(st, st->ops_pool, tensors, bufts, n);
    free(tensors);
    free(bufts);
    if (!placed) {
        return pi_fail(st, "could not allocate device memory for the ops' data");
    }
    for (int32_t i = 0; i < st->n_ops; ++i) {
        struct pi_op * op = &st->ops[i];
        if (op->data) {
            ggml_backend_tensor_set(op->data, op->host, 0, ggml_nbytes(op->data));
        }
    }
    st->ops_uploaded = true;
    return 0;
}

static void pi_rows_reserve(struct pi_rows * rows, int32_t cap) {
    rows->dst_host = realloc(rows->dst_host, (cap + 1) * sizeof(int32_t));
    rows->src_host = realloc(rows->src_host, (cap + 1) * sizeof(int32_t));
}

// the rows of a ubatch (sequence s: n_tokens[s] tokens at pos0[s].., one after the other) op acts on, among
// all its rows and among its output rows (every row with all_logits, else the last of each sequence);
// returns false when per-row data lacks a row
static bool pi_op_rows(struct pi_op * op, int32_t n_seq, const int32_t * n_tokens, const int32_t * pos0,
                       const int32_t * seq_ids, bool all_logits) {
    if (op->seq < 0 && op->positions == NULL && !op->per_row) {
        op->rows.n = op->out_rows.n = -1;
        return true;
    }
    int32_t cap = 0;
    for (int32_t s = 0; s < n_seq; ++s) {
        cap += op->positions ? op->n_positions : n_tokens[s];
    }
    pi_rows_reserve(&op->rows, cap);
    pi_rows_reserve(&op->out_rows, cap);
    int32_t n = 0, n_out = 0, first = 0;
    for (int32_t s = 0; s < n_seq; first += n_tokens[s], ++s) {
        if (op->seq >= 0 && seq_ids[s] != op->seq) {
            continue;
        }
        const int32_t count = op->positions ? op->n_positions : n_tokens[s];
        for (int32_t i = 0; i < count; ++i) {
            const int32_t pos = op->positions ? op->positions[i] : pos0[s] + i;
            if (pos < pos0[s] || pos >= pos0[s] + n_tokens[s]) {
                continue;
            }
            const int32_t src = op->positions ? i : pos;
            if (op->per_row && src >= op->ne[1]) {
                return false;
            }
            const int32_t row = first + (pos - pos0[s]);
            op->rows.dst_host[n]   = row;
            op->rows.src_host[n++] = src;
            if (all_logits || pos == pos0[s] + n_tokens[s] - 1) {
                op->out_rows.dst_host[n_out]   = all_logits ? row : s;
                op->out_rows.src_host[n_out++] = src;
            }
        }
    }
    op->rows.n     = n;
    op->out_rows.n = n_out;
    return true;
}

// new I32 tensors for rows (none when the op has no rows there)
static int32_t pi_rows_tensors(struct ggml_context * ctx, struct pi_rows * rows, int32_t i, const char * what,
                               struct ggml_tensor ** tensors) {
    rows->dst = rows->src = NULL;
    if (rows->n <= 0) {
        return 0;
    }
    rows->dst = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, rows->n);
    rows->src = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, rows->n);
    ggml_format_name(rows->dst, "pi_op_%s-%d", what, i);
    ggml_format_name(rows->src, "pi_op_data_%s-%d", what, i);
    tensors[0] = rows->dst;
    tensors[1] = rows->src;
    return 2;
}

static void pi_rows_upload(const struct pi_rows * rows) {
    if (rows->n > 0) {
        ggml_backend_tensor_set(rows->dst, rows->dst_host, 0, ggml_nbytes(rows->dst));
        ggml_backend_tensor_set(rows->src, rows->src_host, 0, ggml_nbytes(rows->src));
    }
}

// before a decode: data uploaded, and every op's rows of this ubatch in device memory. When an op now
// acts on a different number of rows the graph changes, so the previous one is dropped.
int pi_ops_prepare(struct pi_state * st, int32_t n_seq, const int32_t * n_tokens, const int32_t * pos0,
                   const int32_t * seq_ids, bool all_logits) {
    st->n_ubatch = 0;
    for (int32_t s = 0; s < n_seq; ++s) {
        st->n_ubatch += n_tokens[s];
    }
    st->n_outputs = all_logits ? st->n_ubatch : n_seq;
    bool changed = false;
    if (!st->ops_uploaded) {
        if (pi_ops_upload(st) != 0) {
            return -1;
        }
        changed = true;
    }
    for (int32_t i = 0; i < st->n_ops; ++i) {
        struct pi_op * op = &st->ops[i];
        const int32_t before = op->rows.n, before_out = op->out_rows.n;
        if (!pi_op_rows(op, n_seq, n_tokens, pos0, seq_ids, all_logits)) {
            snprintf(st->error, sizeof(st->error), "op %d on %s-%d: its data has no row for a position of this decode",
                     i, op->name, op->il);
            return -1;
        }
        changed = changed || op->rows.n != before || op->out_rows.n != before_out ||
                  (op->rows.n > 0 && op->rows.dst == NULL) || (op->out_rows.n > 0 && op->out_rows.dst == NULL);
    }
    if (changed) {
        if (st->rows_ctx) {
            ggml_free(st->rows_ctx);
        }
        const int32_t cap = 4*st->n_ops + 1;
        struct ggml_init_params params = { cap * ggml_tensor_overhead(), NULL, true };
        st->rows_ctx = ggml_init(params);
        struct ggml_tensor ** tensors = malloc(cap * sizeof(*tensors));
        ggml_backend_buffer_type_t * bufts = malloc(cap * sizeof(*bufts));
        int32_t n = 0;
        for (int32_t i = 0; i < st->n_ops; ++i) {
            struct pi_op * op = &st->ops[i];
            const int32_t first = n;
            n += pi_rows_tensors(st->rows_ctx, &op->rows, i, "rows", tensors + n);
            n += pi_rows_tensors(st->rows_ctx, &op->out_rows, i, "out_rows", tensors + n);
            for (int32_t j = first; j < n; ++j) {
                bufts[j] = op->buft;
            }
        }
        const bool placed = pi_pools_place(st, st->rows_pool, tensors, bufts, n);
        free(tensors);
        free(bufts);
        if (!placed) {
            return pi_fail(st, "could not allocate device memory for the ops' rows");
        }
        pi_drop_graph(st);
    }
    for (int32_t i = 0; i < st->n_ops; ++i) {
        pi_rows_upload(&st->ops[i].rows);
        pi_rows_upload(&st->ops[i].out_rows);
    }
    return 0;
}

// keep t as an output of the graph
static struct ggml_tensor * pi_output(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * t,
                                      const char * name) {
    if (ggml_is_view(t) || !ggml_is_contiguous(t)) {
        t = ggml_cont(ctx, t);
        ggml_format_name(t, "%s (capture)", name);
    }
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
    return t;
}

// the rows `op` selects, changed by the op, as [width, rows->n]
static struct ggml_tensor * pi_op_rows_changed(struct ggml_context * ctx, struct pi_op * op, const struct pi_rows * sel,
                                               struct ggml_tensor * rows, int64_t width, const struct ggml_tensor * cur,
                                               int64_t n_rows) {
    struct ggml_tensor * with = op->per_row ? ggml_get_rows(ctx, ggml_reshape_2d(ctx, op->data, width, op->ne[1]), sel->src)
                                           : op->data;
    switch (op->kind) {
        case PI_OP_SET:
        case PI_OP_INJECT: return op->per_row ? with : ggml_repeat_4d(ctx, with, width, sel->n, 1, 1);
        case PI_OP_ADD: return ggml_add(ctx, rows, with);
        case PI_OP_MUL: {
            if (op->per_row) {
                return ggml_mul(ctx, rows, with);
            }
            // one token's slice keeps its shape, so data broadcasts over it as over the whole tensor
            struct ggml_tensor * shaped = cur->ne[2] == n_rows ?
                ggml_reshape_3d(ctx, rows, cur->ne[0], cur->ne[1], sel->n) : ggml_reshape_2d(ctx, rows, cur->ne[0], sel->n);
            return ggml_reshape_2d(ctx, ggml_mul(ctx, shaped, op->data), width, sel->n);
        }
        default: return NULL;
    }
}

// whether cur has one row per token of n tokens, the tokens its last axis
static bool pi_has_rows(const struct ggml_tensor * cur, int64_t n) {
    return cur->ne[3] == 1 && (cur->ne[2] == n || (cur->ne[2] == 1 && cur->ne[1] == n));
}

// apply op to cur (the first tensor named op->name in layer op->il of this build); returns what takes its place
struct ggml_tensor * pi_op_apply(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                 struct pi_op * op, struct ggml_tensor * cur) {
    if (op->rows.n == 0) {
        return cur;
    }
    if (op->rows.n < 0) {
        switch (op->kind) {
            case PI_OP_CAPTURE:
                op->out = pi_output(ctx, gf, cur, cur->name);
                return cur;
            case PI_OP_MUL:
            case PI_OP_ADD: {
                if (!ggml_can_repeat(op->data, cur)) {
                    return cur; // checked by the caller against the tensor's shape; never broadcast wrongly
                }
                struct ggml_tensor * out = op->kind == PI_OP_MUL ? ggml_mul(ctx, cur, op->data) : ggml_add(ctx, cur, op->data);
                ggml_format_name(out, "%s (%s)", cur->name, op->kind == PI_OP_MUL ? "scaled" : "added");
                return out;
            }
            default:
                return cur;
        }
    }
    // the tokens are the last axis: the tensor as [width, n] rows. The last layer's tensors after attention
    // keep the output rows only; the other rows can change no output, so an op on them is dropped there.
    int64_t n = st->n_ubatch;
    const struct pi_rows * sel = &op->rows;
    if (!pi_has_rows(cur, n)) {
        n   = st->n_outputs;
        sel = &op->out_rows;
        if (!pi_has_rows(cur, n) || op->kind == PI_OP_CAPTURE) {
            st->build_failed = "an op on chosen rows met a tensor without one row per token of the batch "
                               "(on the last layer, captures need the logits of every token)";
            return cur;
        }
        if (sel->n == 0) {
            return cur;
        }
    }
    struct ggml_tensor * x = ggml_is_contiguous(cur) ? cur : ggml_cont(ctx, cur);
    x = ggml_reshape_2d(ctx, x, ggml_nelements(cur) / n, n);
    if (op->kind != PI_OP_SET && op->per_row && op->data->ne[0] != x->ne[0]) {
        return cur;
    }
    if (op->kind == PI_OP_CAPTURE) {
        op->out = pi_output(ctx, gf, ggml_get_rows(ctx, x, sel->dst), cur->name);
        return cur;
    }
    if ((op->kind == PI_OP_SET || op->kind == PI_OP_INJECT) && op->data->ne[0] != x->ne[0]) {
        return cur;
    }
    const bool reads = op->kind != PI_OP_SET && op->kind != PI_OP_INJECT;
    struct ggml_tensor * rows = reads ? ggml_get_rows(ctx, x, sel->dst) : NULL;
    struct ggml_tensor * changed = pi_op_rows_changed(ctx, op, sel, rows, x->ne[0], cur, n);
    if (changed == NULL) {
        return cur;
    }
    if (op->kind == PI_OP_INJECT) {
        // every row, in order (checked at pi_op_add): the data's rows are the tensor, cur is not read
        struct ggml_tensor * out = ggml_reshape_4d(ctx, changed, cur->ne[0], cur->ne[1], cur->ne[2], cur->ne[3]);
        ggml_format_name(out, "%s (injected)", cur->name);
        st->injected = out;
        return out;
    }
    struct ggml_tensor * out = ggml_set_rows(ctx, ggml_dup(ctx, x), changed, sel->dst);
    out = ggml_reshape_4d(ctx, out, cur->ne[0], cur->ne[1], cur->ne[2], cur->ne[3]);
    ggml_format_name(out, "%s (%s rows)", cur->name, op->kind == PI_OP_SET ? "set" : op->kind == PI_OP_ADD ? "added" : "scaled");
    return out;
}
