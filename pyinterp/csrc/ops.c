// pyinterp native layer: the op table. Every intervention and capture is a record here (what to do to
// which tensor of which layer, for which sequence and positions); the graph-build hook applies them with
// a few generic ggml recipes. The records' data lives in device memory kept across runs.

#include "internal.h"

#define PI_OP_ROOM 16           // graph nodes one op may add, at most

// rows of a [.., n_rows] tensor an op acts on; n -1: the whole tensor, 0: none (inactive)
struct pi_rows {
    int32_t n;
    int32_t * dst_host;             // [n] rows of the tensor
    int32_t * src_host;             // [n] rows of the op's data (per_row)
    struct ggml_tensor * dst;       // [n] I32, in the rows pool
    struct ggml_tensor * src;       // [n] I32
};

struct pi_op {
    int32_t kind;                   // enum pi_op_kind
    char    name[PI_NAME_MAX];      // base name, e.g. "l_out"
    int32_t il;                     // layer, -1 for tensors outside the layers
    int32_t seq;                    // llama.cpp sequence, -1 every sequence
    int32_t * positions;            // [n_positions] token positions, NULL: every token
    int32_t n_positions;
    bool    per_row;                // data holds one row per position
    float * host;                   // data until it is uploaded (NULL for captures)
    int64_t ne[4];
    ggml_backend_buffer_type_t buft; // the device of the layer

    struct ggml_tensor * data;      // ne, F32, in the ops pool
    // the rows of the current ubatch the op acts on, and the same among the output rows (the last layer's
    // tensors after llama.cpp drops the rows whose logits are not wanted)
    struct pi_rows rows;
    struct pi_rows out_rows;

    bool done;                      // applied in the current build (the first tensor of that name only)
    struct ggml_tensor * out;       // the captured tensor of the last build
};

struct pi_ops {
    struct pi_op * ops;
    int32_t n_ops;
    bool    uploaded;               // the ops' data is in the ops pool
    struct ggml_context * data_ctx; // the ops' data tensors
    struct ggml_context * rows_ctx; // the ops' row tensors
    struct pi_pool data_pool[PI_MAX_POOLS];
    struct pi_pool rows_pool[PI_MAX_POOLS];
};

extern const struct pi_recipe pi_recipe_ops;

static void pi_ops_clear(struct pi_state * st, void * data) {
    struct pi_ops * self = data;
    for (int32_t i = 0; i < self->n_ops; ++i) {
        struct pi_op * op = &self->ops[i];
        free(op->positions);
        free(op->host);
        free(op->rows.dst_host);
        free(op->rows.src_host);
        free(op->out_rows.dst_host);
        free(op->out_rows.src_host);
    }
    free(self->ops);
    self->ops      = NULL;
    self->n_ops    = 0;
    self->uploaded = false;
    if (self->data_ctx) {
        ggml_free(self->data_ctx);
        self->data_ctx = NULL;
    }
    if (self->rows_ctx) {
        ggml_free(self->rows_ctx);
        self->rows_ctx = NULL;
    }
}

static void pi_ops_release(struct pi_state * st, void * data) {
    struct pi_ops * self = data;
    pi_pools_free(self->data_pool);
    pi_pools_free(self->rows_pool);
}

static bool pi_ops_active(const struct pi_state * st, const void * data) {
    const struct pi_ops * self = data;
    return self->n_ops > 0;
}

int32_t pi_op_add(struct pi_state * st, int32_t kind, const char * name, int32_t il, int32_t seq,
                  const int32_t * positions, int32_t n_positions, const float * data, const int64_t * ne, bool per_row) {
    struct pi_ops * self = pi_self(st, &pi_recipe_ops);
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
    self->ops = realloc(self->ops, (self->n_ops + 1) * sizeof(struct pi_op));
    struct pi_op * op = &self->ops[self->n_ops];
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
    self->uploaded = false;
    self->n_ops += 1;
    pi_update_hook(st);
    return self->n_ops - 1;
}

// shape of what op i captured in the last graph, in ggml order (ne[0] fastest); false when it captured nothing
bool pi_op_shape(const struct pi_state * st, int32_t i, int64_t * ne) {
    const struct pi_ops * self = pi_self(st, &pi_recipe_ops);
    if (i < 0 || i >= self->n_ops || self->ops[i].out == NULL) {
        return false;
    }
    for (int d = 0; d < 4; ++d) {
        ne[d] = self->ops[i].out->ne[d];
    }
    return true;
}

// copy what op i captured to dst (room for n_dst floats) as float32, keeping the first n0 of ne[0] elements of
// every row
int pi_op_read(struct pi_state * st, int32_t i, float * dst, int64_t n_dst, int64_t n0) {
    const struct pi_ops * self = pi_self(st, &pi_recipe_ops);
    if (i < 0 || i >= self->n_ops || self->ops[i].out == NULL) {
        return pi_fail(st, "tensor was not captured");
    }
    return pi_read_f32(st, self->ops[i].out, dst, n_dst, n0);
}

// the ops' data, to device memory (once per plan)
static int pi_ops_upload(struct pi_state * st, struct pi_ops * self) {
    if (self->data_ctx) {
        ggml_free(self->data_ctx);
    }
    struct ggml_init_params params = { (self->n_ops + 1) * ggml_tensor_overhead(), NULL, true };
    self->data_ctx = ggml_init(params);
    struct ggml_tensor ** tensors = malloc((self->n_ops + 1) * sizeof(*tensors));
    ggml_backend_buffer_type_t * bufts = malloc((self->n_ops + 1) * sizeof(*bufts));
    int32_t n = 0;
    for (int32_t i = 0; i < self->n_ops; ++i) {
        struct pi_op * op = &self->ops[i];
        op->data = NULL;
        if (op->host == NULL) {
            continue;
        }
        op->data = ggml_new_tensor_4d(self->data_ctx, GGML_TYPE_F32, op->ne[0], op->ne[1], op->ne[2], op->ne[3]);
        ggml_format_name(op->data, "pi_op_data-%d", i);
        tensors[n] = op->data;
        bufts[n++] = op->buft;
    }
    const bool placed = pi_pools_place(self->data_pool, tensors, bufts, n);
    free(tensors);
    free(bufts);
    if (!placed) {
        return pi_fail(st, "could not allocate device memory for the ops' data");
    }
    for (int32_t i = 0; i < self->n_ops; ++i) {
        struct pi_op * op = &self->ops[i];
        if (op->data) {
            ggml_backend_tensor_set(op->data, op->host, 0, ggml_nbytes(op->data));
        }
    }
    self->uploaded = true;
    return 0;
}

static void pi_rows_reserve(struct pi_rows * rows, int32_t cap) {
    rows->dst_host = realloc(rows->dst_host, (cap + 1) * sizeof(int32_t));
    rows->src_host = realloc(rows->src_host, (cap + 1) * sizeof(int32_t));
}

// the rows of a ubatch (sequence s: n_tokens[s] tokens at pos0[s].., one after the other) op acts on, among
// all its rows and among its output rows (every row with all_logits, else the last of each sequence);
// returns false when per-row data lacks a row
static bool pi_op_rows(struct pi_op * op, const struct pi_batch * batch) {
    const int32_t n_seq = batch->n_seq;
    const int32_t * n_tokens = batch->n_tokens;
    const int32_t * pos0 = batch->pos0;
    const bool all_logits = batch->all_logits;
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
        if (op->seq >= 0 && batch->seq_ids[s] != op->seq) {
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

// the row tensors of every op, placed in the rows pool
static int pi_ops_place_rows(struct pi_state * st, struct pi_ops * self) {
    if (self->rows_ctx) {
        ggml_free(self->rows_ctx);
    }
    const int32_t cap = 4*self->n_ops + 1;
    struct ggml_init_params params = { cap * ggml_tensor_overhead(), NULL, true };
    self->rows_ctx = ggml_init(params);
    struct ggml_tensor ** tensors = malloc(cap * sizeof(*tensors));
    ggml_backend_buffer_type_t * bufts = malloc(cap * sizeof(*bufts));
    int32_t n = 0;
    for (int32_t i = 0; i < self->n_ops; ++i) {
        struct pi_op * op = &self->ops[i];
        const int32_t first = n;
        n += pi_rows_tensors(self->rows_ctx, &op->rows, i, "rows", tensors + n);
        n += pi_rows_tensors(self->rows_ctx, &op->out_rows, i, "out_rows", tensors + n);
        for (int32_t j = first; j < n; ++j) {
            bufts[j] = op->buft;
        }
    }
    const bool placed = pi_pools_place(self->rows_pool, tensors, bufts, n);
    free(tensors);
    free(bufts);
    return placed ? 0 : pi_fail(st, "could not allocate device memory for the ops' rows");
}

// before a decode: data uploaded, and every op's rows of this ubatch in device memory. When an op now
// acts on a different number of rows the graph changes, so the previous one is dropped.
static int pi_ops_prepare(struct pi_state * st, void * data, const struct pi_batch * batch) {
    struct pi_ops * self = data;
    bool changed = false;
    if (!self->uploaded) {
        if (pi_ops_upload(st, self) != 0) {
            return -1;
        }
        changed = true;
    }
    for (int32_t i = 0; i < self->n_ops; ++i) {
        struct pi_op * op = &self->ops[i];
        const int32_t before = op->rows.n, before_out = op->out_rows.n;
        if (!pi_op_rows(op, batch)) {
            snprintf(st->error, sizeof(st->error), "op %d on %s-%d: its data has no row for a position of this decode",
                     i, op->name, op->il);
            return -1;
        }
        changed = changed || op->rows.n != before || op->out_rows.n != before_out ||
                  (op->rows.n > 0 && op->rows.dst == NULL) || (op->out_rows.n > 0 && op->out_rows.dst == NULL);
    }
    if (changed) {
        if (pi_ops_place_rows(st, self) != 0) {
            return -1;
        }
        pi_drop_graph(st);
    }
    for (int32_t i = 0; i < self->n_ops; ++i) {
        pi_rows_upload(&self->ops[i].rows);
        pi_rows_upload(&self->ops[i].out_rows);
    }
    return 0;
}

// keep t as an output of the graph
static struct ggml_tensor * pi_output(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                      struct ggml_tensor * t, const struct ggml_tensor * cur) {
    if (ggml_is_view(t) || !ggml_is_contiguous(t)) {
        t = ggml_cont(ctx, t);
        ggml_format_name(t, "%s (capture)", cur->name);
    }
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
    pi_keep(st, cur, t);
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
static struct ggml_tensor * pi_op_apply(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                 struct pi_op * op, struct ggml_tensor * cur) {
    if (op->rows.n == 0) {
        return cur;
    }
    if (op->rows.n < 0) {
        switch (op->kind) {
            case PI_OP_CAPTURE:
                op->out = pi_output(st, ctx, gf, cur, cur);
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
        op->out = pi_output(st, ctx, gf, ggml_get_rows(ctx, x, sel->dst), cur);
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

static void pi_ops_begin(struct pi_state * st, void * data) {
    struct pi_ops * self = data;
    for (int32_t i = 0; i < self->n_ops; ++i) {
        self->ops[i].done = false;
        self->ops[i].out  = NULL;
    }
}

// the ops on (name, il), in the order they were added
static struct ggml_tensor * pi_ops_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                          struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                          int32_t il) {
    struct pi_ops * self = data;
    for (int32_t i = 0; i < self->n_ops; ++i) {
        struct pi_op * op = &self->ops[i];
        if (op->done || op->il != il || strcmp(op->name, name) != 0) {
            continue;
        }
        op->done = true;
        if (!pi_room(gf, PI_OP_ROOM)) {
            st->build_failed = PI_NO_ROOM;
            continue;
        }
        cur = pi_op_apply(st, ctx, gf, op, cur);
    }
    return cur;
}

const struct pi_recipe pi_recipe_ops = {
    .name    = "ops",
    .size    = sizeof(struct pi_ops),
    .clear   = pi_ops_clear,
    .release = pi_ops_release,
    .active  = pi_ops_active,
    .prepare = pi_ops_prepare,
    .begin   = pi_ops_begin,
    .tensor  = pi_ops_tensor,
};
