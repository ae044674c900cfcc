// pyinterp native layer: the graph-build hook. llama.cpp offers it every named tensor while it builds a
// graph; it hands each to the recipes in turn (recipes.c), lets them add their outputs at the logits, and
// leaves out of the computation what an injected tensor made useless.

#include "internal.h"

const char * PI_NO_ROOM = "the graph llama.cpp allocated has no room for this on every layer";

bool pi_room(struct ggml_cgraph * gf, int n) {
    return ggml_graph_size(gf) - ggml_graph_n_nodes(gf) >= n;
}

struct ggml_tensor * pi_unembedding(struct ggml_tensor * out) {
    while (out != NULL && out->op != GGML_OP_MUL_MAT) {
        out = out->src[0];
    }
    return out;
}

struct ggml_tensor * pi_sparse_activate(struct ggml_context * ctx, int32_t activation, struct ggml_tensor * pre,
                                        struct ggml_tensor * threshold, int32_t k) {
    const int64_t d = pre->ne[0];
    const int64_t n = pre->ne[1];
    switch (activation) {
        case PI_SAE_JUMPRELU:
            return ggml_mul(ctx, ggml_relu(ctx, pre), ggml_step(ctx, ggml_sub(ctx, pre, threshold)));
        case PI_SAE_TOPK: {
            // the k largest pre-activations, through the ReLU, scattered back into zeros
            struct ggml_tensor * idx  = ggml_top_k(ctx, pre, k);                                     // [k, n]
            struct ggml_tensor * vals = ggml_get_rows(ctx, ggml_reshape_3d(ctx, pre, 1, d, n), idx); // [1, k, n]
            struct ggml_tensor * zero = ggml_reshape_3d(ctx, ggml_scale(ctx, pre, 0.0f), 1, d, n);
            return ggml_reshape_2d(ctx, ggml_set_rows(ctx, zero, ggml_relu(ctx, vals), idx), d, n);
        }
        default:
            return ggml_relu(ctx, pre);
    }
}

// forget what the previous graph build did
static void pi_build_begin(struct pi_state * st) {
    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        if (pi_recipes[i]->begin != NULL) {
            pi_recipes[i]->begin(st, st->self[i]);
        }
    }
    ggml_reset(st->meta);
    st->final_in     = NULL;
    st->build_failed = NULL;
    st->injected     = NULL;
    st->last_read    = NULL;
    st->n_kept       = 0;
    st->n_skipped    = 0;
    st->n_builds    += 1;
}

// the slot of t in an open-addressing table of n_slots (a power of 2): its own, or the empty one it would take
static size_t pi_slot(struct ggml_tensor * const * keys, size_t n_slots, const struct ggml_tensor * t) {
    size_t h = ((uintptr_t) t >> 4) & (n_slots - 1);
    while (keys[h] != NULL && keys[h] != t) {
        h = (h + 1) & (n_slots - 1);
    }
    return h;
}

// index of src among the graph's nodes, or -1 (no source, or a leaf)
static int32_t pi_node_index(struct ggml_tensor * const * keys, const int32_t * values, size_t n_slots,
                             const struct ggml_tensor * src) {
    if (src == NULL) {
        return -1;
    }
    const size_t h = pi_slot(keys, n_slots, src);
    return keys[h] ? values[h] : -1;
}

static bool pi_computes(enum ggml_op op) {
    return op != GGML_OP_NONE && op != GGML_OP_VIEW && op != GGML_OP_RESHAPE && op != GGML_OP_PERMUTE &&
           op != GGML_OP_TRANSPOSE;
}

void pi_keep(struct pi_state * st, const struct ggml_tensor * read, struct ggml_tensor * out) {
    if (st->n_kept == st->cap_kept) {
        const int32_t cap = st->cap_kept ? 2*st->cap_kept : 64;
        struct ggml_tensor ** kept = realloc(st->kept, cap * sizeof(*kept));
        if (kept == NULL) {
            st->build_failed = "out of memory";
            return;
        }
        st->kept     = kept;
        st->cap_kept = cap;
    }
    st->kept[st->n_kept++] = out;
    st->last_read = read; // the hook sees tensors in build order: the latest so far
}

// After an inject op, the graph still holds what led to the injected tensor, and the KV cache writes of the
// layers before it; a truncated pass holds the layers after the last tensor its outputs read, and the logits.
// Once the graph is complete (result expanded), a node is needed when it is a sink (nothing in the graph reads
// it: the result, the KV writes, captures) that depends on the injected tensor and, truncated, not on the last
// tensor read (a KV write of an earlier layer, which later attention reads through the cache); or a kept output
// of a truncated pass; or when it feeds a needed node. The others become GGML_OP_NONE: the backends skip them
// (ggml-backend uses such nodes itself).
static void pi_skip_unneeded(struct pi_state * st, struct ggml_cgraph * gf) {
    const int32_t n = ggml_graph_n_nodes(gf);
    size_t n_slots = 16;
    while (n_slots < 2 * (size_t) n) {
        n_slots *= 2;
    }
    struct ggml_tensor ** keys = calloc(n_slots, sizeof(*keys));
    int32_t * values = malloc(n_slots * sizeof(*values));
    bool * depends = calloc(n, sizeof(bool)); // on the injected tensor (every node, when none)
    bool * after   = calloc(n, sizeof(bool)); // on the last tensor read (no node, when not truncated)
    bool * read    = calloc(n, sizeof(bool));
    bool * needed  = calloc(n, sizeof(bool));
    for (int32_t i = 0; i < n; ++i) {
        struct ggml_tensor * t = ggml_graph_node(gf, i);
        const size_t h = pi_slot(keys, n_slots, t);
        keys[h] = t;
        values[h] = i;
    }
    // nodes come in dependency order: sources first
    for (int32_t i = 0; i < n; ++i) {
        struct ggml_tensor * t = ggml_graph_node(gf, i);
        depends[i] = st->injected == NULL || t == st->injected;
        after[i]   = st->truncate && t == st->last_read;
        for (int j = 0; j < GGML_MAX_SRC; ++j) { // not only up to the first empty slot: some ops leave gaps
            const int32_t k = pi_node_index(keys, values, n_slots, t->src[j]);
            if (k >= 0) {
                read[k] = true;
                depends[i] = depends[i] || depends[k];
                after[i]   = after[i] || after[k];
            }
        }
    }
    if (st->truncate) {
        for (int32_t i = 0; i < st->n_kept; ++i) {
            const int32_t k = pi_node_index(keys, values, n_slots, st->kept[i]);
            if (k >= 0) {
                needed[k] = true;
            }
        }
    }
    for (int32_t i = n - 1; i >= 0; --i) {
        struct ggml_tensor * t = ggml_graph_node(gf, i);
        needed[i] = needed[i] || (!read[i] && depends[i] && !after[i]);
        if (!needed[i]) {
            continue;
        }
        for (int j = 0; j < GGML_MAX_SRC; ++j) {
            const int32_t k = pi_node_index(keys, values, n_slots, t->src[j]);
            if (k >= 0) {
                needed[k] = true;
            }
        }
    }
    for (int32_t i = 0; i < n; ++i) {
        struct ggml_tensor * t = ggml_graph_node(gf, i);
        if (!needed[i] && pi_computes(t->op)) {
            t->op = GGML_OP_NONE;
            st->n_skipped += 1;
        }
    }
    free(keys);
    free(values);
    free(depends);
    free(after);
    free(read);
    free(needed);
}

// Some names are given to several tensors of a layer (llama names both the FFN output and the residual
// sum after it "ffn_out"; Qcur is named before and after RoPE): recipes act on the first.
struct ggml_tensor * pi_hook(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * cur,
                             const char * name, int32_t il, void * user_data) {
    struct pi_state * st = user_data;
    (void) ctx; // the hook's tensors go in its own context: llama.cpp's has room for the model's only

    // a graph only grows while it is built: fewer nodes than at the last call means a new build (pi_decode
    // sets n_nodes to INT_MAX; llama_decode may build a reserve graph before the real one, or reuse the last)
    const int n_nodes = ggml_graph_n_nodes(gf);
    if (n_nodes < st->n_nodes) {
        pi_build_begin(st);
    }
    st->n_nodes = n_nodes;
    st->gf      = gf;

    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        if (pi_recipes[i]->tensor != NULL) {
            cur = pi_recipes[i]->tensor(st, st->self[i], st->meta, gf, cur, name, il);
        }
    }
    if (il == st->n_layer - 1 && st->final_in == NULL && strcmp(name, "l_out") == 0) {
        st->final_in = cur;
    }
    if (il == -1 && strcmp(name, "result_output") == 0) {
        for (int32_t i = 0; i < pi_n_recipes; ++i) {
            if (pi_recipes[i]->output != NULL && pi_recipes[i]->active(st, st->self[i])) {
                pi_recipes[i]->output(st, st->self[i], st->meta, gf, cur);
            }
        }
        if (st->injected != NULL || (st->truncate && st->last_read != NULL)) {
            ggml_build_forward_expand(gf, cur); // llama.cpp does next; the graph is then complete
            pi_skip_unneeded(st, gf);
        }
    }
    return cur;
}

// the nodes of the graph of the last decode (built while the hook was set): name, op, type, shape, sources
int32_t pi_graph_n_nodes(const struct pi_state * st) {
    return st->gf ? ggml_graph_n_nodes(st->gf) : 0;
}

const char * pi_graph_node_line(struct pi_state * st, int32_t i) {
    const struct ggml_tensor * t = ggml_graph_node(st->gf, i);
    int n = snprintf(st->line, sizeof(st->line), "%-28s %-12s %-5s [%5lld, %5lld, %5lld, %5lld]", t->name,
                     ggml_op_desc(t), ggml_type_name(t->type),
                     (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3]);
    for (int j = 0; j < GGML_MAX_SRC && t->src[j] && n < (int) sizeof(st->line); ++j) {
        n += snprintf(st->line + n, sizeof(st->line) - n, "%s%s", j == 0 ? " <- " : ", ",
                      t->src[j]->name[0] ? t->src[j]->name : ggml_op_desc(t->src[j]));
    }
    return st->line;
}

int32_t pi_n_skipped(const struct pi_state * st) {
    return st->n_skipped;
}

void pi_set_truncate(struct pi_state * st, bool truncate) {
    if (truncate != st->truncate) {
        st->truncate = truncate;
        pi_drop_graph(st);
    }
}
