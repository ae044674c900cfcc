// pyinterp native layer: model/context setup, decoding, and the graph-build hook that runs the
// interventions (head masks, row patches), captures, the logit lens and logit attribution inside the
// ggml graph.
//
// The Python side describes a plan (what to capture, which heads to mask, which rows to patch, what to
// unembed), then decodes. The hook is set on the llama_context only while the plan is not empty, so a
// run without interventions is stock llama.cpp.

#include "interp.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#ifdef PYINTERP_RPC
#include "ggml-rpc.h"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI_NAME_MAX 64
#define PI_META_TENSORS 16384   // tensors the hook may add to one graph
#define PI_ROOM 64              // graph nodes one layer's lens or attribution term may add, at most

// the graph llama.cpp allocated (for its own nodes) has room for another PI_ROOM
static bool pi_room(struct ggml_cgraph * gf) {
    return ggml_graph_size(gf) - ggml_graph_n_nodes(gf) >= PI_ROOM;
}

static const char * PI_NO_ROOM = "the graph llama.cpp allocated has no room for this on every layer";

struct pi_capture {
    char  name[PI_NAME_MAX];   // base name, e.g. "l_out"
    int32_t il;                // layer, -1 for tensors outside the layers
    struct ggml_tensor * t;    // set by the hook during the last graph build
};

struct pi_patch {
    char  name[PI_NAME_MAX];
    int32_t il;
    int32_t pos;                    // position (token index in the sequence) of the row to replace
    bool done;                      // applied in the current build
    struct ggml_context * ctx;      // owns vec and idx
    ggml_backend_buffer_t buf;      // on the device of the layer
    struct ggml_tensor * vec;       // [width, 1] F32
    struct ggml_tensor * idx;       // [1] I64: row inside the current ubatch
    bool active;                    // pos falls inside the current ubatch
};

struct pi_layer {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor * head_mask; // [n_head] F32, 1 = keep, 0 = silence
    struct ggml_tensor * eye;       // [1, n_head, n_head] F32 identity: spreads the heads apart (per-head attribution)
    bool masked;                    // apply head_mask in this layer
    bool scores_masked;             // head_mask was applied to attn_scores in the current build
};

// logit lens: every layer's `name` tensor through the model's final norm (or not) and unembedding,
// reduced to the top-k probabilities per token inside the graph, and to the logit, log-probability and
// rank of chosen target tokens
struct pi_lens {
    char  name[PI_NAME_MAX];
    bool  norm;
    int32_t k;
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

// direct logit attribution: chosen tensors (the residual stream's terms) through the final RMS norm,
// frozen at the scale of the final residual, and the unembedding rows of chosen tokens
struct pi_attr_term {
    char    name[PI_NAME_MAX];
    int32_t il;
    bool    by_head;                // also split the term (an attention output) by head
    struct ggml_tensor * in;        // the term, recorded during the build
    struct ggml_tensor * out;       // [n_targets, n_tokens] F32 its logit contribution to each target
    struct ggml_tensor * heads;     // [n_targets, n_head, n_tokens] F32 each head's share of it (when by_head)
};

struct pi_attr {
    struct pi_attr_term * terms;
    int32_t n_terms;
    struct ggml_context * ctx;      // owns targets
    ggml_backend_buffer_t buf;      // on the output device
    struct ggml_tensor * targets;   // [n_targets] I32 token ids
    const char * failed;            // why the attribution could not be built (NULL: it was)
};

struct pi_seen {
    char    name[PI_NAME_MAX + 8]; // "l_out-3"
    int64_t ne[4];
};

struct pi_state {
    struct llama_context * ctx;
    const struct llama_model * model;
    int32_t n_layer;
    int32_t n_head;

    struct pi_layer * layers;

    struct pi_capture * captures;
    int32_t n_captures;

    struct pi_patch * patches;
    int32_t n_patches;

    // every (name, il) offered to the hook during the last build, when recording
    bool record;
    struct pi_seen * seen;
    int32_t n_seen;
    int32_t cap_seen;

    struct pi_lens lens;            // active when lens.k > 0
    struct pi_attr attr;            // active when attr.n_terms > 0
    struct ggml_tensor * final_in;  // the last layer's l_out: where the model's own unembedding starts

    struct ggml_context * meta;     // the tensors the hook adds to a graph (reset at every build): llama.cpp's graph
                                    // context has room for the model's own only
    struct ggml_cgraph * gf;        // the graph of the last build (valid until the next one)
    char line[1024];                // pi_graph_node_line's result

    int n_nodes;                    // nodes of the graph being built, at the last hook call

    bool hook_set;
    char error[256];
};

static void pi_attr_free(struct pi_state * st);
static void pi_lens_targets_free(struct pi_state * st);

static int pi_fail(struct pi_state * st, const char * msg) {
    snprintf(st->error, sizeof(st->error), "%s", msg);
    return -1;
}

const char * pi_last_error(const struct pi_state * st) {
    return st->error;
}

//
// model and context
//

// rpc_endpoint (host:port of a ggml RPC server, or NULL): offload to that server's first device only
struct llama_model * pi_model_load(const char * path, int32_t n_gpu_layers, const char * rpc_endpoint) {
    struct llama_model_params params = llama_model_default_params();
    params.n_gpu_layers = n_gpu_layers;
    ggml_backend_dev_t devices[2] = { NULL, NULL };
    if (rpc_endpoint != NULL) {
#ifdef PYINTERP_RPC
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(rpc_endpoint);
        if (reg == NULL || ggml_backend_reg_dev_count(reg) == 0) {
            return NULL;
        }
        devices[0] = ggml_backend_reg_dev_get(reg, 0);
        params.devices = devices;
#else
        return NULL;
#endif
    }
    return llama_model_load_from_file(path, params);
}

bool pi_has_rpc(void) {
#ifdef PYINTERP_RPC
    return true;
#else
    return false;
#endif
}

// serve this process's CPU to ggml RPC clients at endpoint (host:port); returns only on failure
void pi_rpc_serve(const char * endpoint, int32_t n_threads) {
#ifdef PYINTERP_RPC
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_rpc_start_server(endpoint, NULL, n_threads, 1, &cpu);
#else
    (void) endpoint;
    (void) n_threads;
#endif
}

// flash_attn: -1 auto, 0 off (the explicit path on every layer), 1 on; type_k/type_v: enum ggml_type of the KV cache
struct llama_context * pi_context_new(struct llama_model * model, uint32_t n_ctx, int32_t n_threads, int32_t flash_attn,
                                      int32_t type_k, int32_t type_v) {
    struct llama_context_params params = llama_context_default_params();
    params.n_ctx           = n_ctx;
    params.n_batch         = n_ctx;   // one prompt is one ubatch: patch rows and captures index it directly
    params.n_ubatch        = n_ctx;
    params.n_seq_max       = 1;
    params.n_threads       = n_threads;
    params.n_threads_batch = n_threads;
    params.swa_full        = true;    // KV cell i holds position i in every layer
    params.no_perf         = true;
    params.flash_attn_type = flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO :
                             flash_attn > 0 ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    params.type_k          = (enum ggml_type) type_k;
    params.type_v          = (enum ggml_type) type_v;
    return llama_init_from_model(model, params);
}

//
// state
//

static ggml_backend_buffer_type_t pi_layer_buft(const struct pi_state * st, int32_t il) {
    return ggml_backend_dev_buffer_type(llama_model_layer_dev(st->model, il));
}

struct pi_state * pi_state_new(struct llama_context * ctx) {
    struct pi_state * st = calloc(1, sizeof(struct pi_state));
    st->ctx     = ctx;
    st->model   = llama_get_model(ctx);
    st->n_layer = llama_model_n_layer(st->model);
    st->n_head  = llama_model_n_head(st->model);
    st->layers  = calloc(st->n_layer, sizeof(struct pi_layer));
    st->lens.in    = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    st->lens.ids   = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    st->lens.probs = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    st->lens.stats = calloc(st->n_layer + 1, sizeof(struct ggml_tensor *));
    struct ggml_init_params meta_params = { PI_META_TENSORS * ggml_tensor_overhead(), NULL, true };
    st->meta = ggml_init(meta_params);

    float * eye = calloc((size_t) st->n_head * st->n_head, sizeof(float));
    for (int32_t h = 0; h < st->n_head; ++h) {
        eye[h * st->n_head + h] = 1.0f;
    }
    for (int32_t il = 0; il < st->n_layer; ++il) {
        struct pi_layer * layer = &st->layers[il];
        struct ggml_init_params params = { 2*ggml_tensor_overhead(), NULL, true };
        layer->ctx       = ggml_init(params);
        layer->head_mask = ggml_new_tensor_1d(layer->ctx, GGML_TYPE_F32, st->n_head);
        layer->eye       = ggml_new_tensor_3d(layer->ctx, GGML_TYPE_F32, 1, st->n_head, st->n_head);
        ggml_format_name(layer->head_mask, "pi_head_mask-%d", il);
        ggml_format_name(layer->eye, "pi_eye-%d", il);
        layer->buf = ggml_backend_alloc_ctx_tensors_from_buft(layer->ctx, pi_layer_buft(st, il));
        if (layer->buf == NULL) {
            free(eye);
            pi_state_free(st);
            return NULL;
        }
        ggml_backend_tensor_set(layer->eye, eye, 0, ggml_nbytes(layer->eye));
    }
    free(eye);
    return st;
}

static void pi_patches_free(struct pi_state * st) {
    for (int32_t i = 0; i < st->n_patches; ++i) {
        ggml_backend_buffer_free(st->patches[i].buf);
        ggml_free(st->patches[i].ctx);
    }
    free(st->patches);
    st->patches   = NULL;
    st->n_patches = 0;
}

void pi_state_free(struct pi_state * st) {
    if (st == NULL) {
        return;
    }
    if (st->hook_set) {
        llama_set_graph_hook(st->ctx, NULL, NULL);
    }
    for (int32_t il = 0; il < st->n_layer; ++il) {
        if (st->layers[il].buf) {
            ggml_backend_buffer_free(st->layers[il].buf);
        }
        if (st->layers[il].ctx) {
            ggml_free(st->layers[il].ctx);
        }
    }
    pi_patches_free(st);
    pi_attr_free(st);
    pi_lens_targets_free(st);
    free(st->lens.in);
    free(st->lens.ids);
    free(st->lens.probs);
    free(st->lens.stats);
    if (st->meta) {
        ggml_free(st->meta);
    }
    free(st->layers);
    free(st->captures);
    free(st->seen);
    free(st);
}

//
// plan
//

static bool pi_plan_empty(const struct pi_state * st) {
    if (st->n_captures > 0 || st->n_patches > 0 || st->record || st->lens.k > 0 || st->attr.n_terms > 0) {
        return false;
    }
    for (int32_t il = 0; il < st->n_layer; ++il) {
        if (st->layers[il].masked) {
            return false;
        }
    }
    return true;
}

static struct ggml_tensor * pi_hook(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * cur,
                                    const char * name, int32_t il, void * user_data);

static void pi_update_hook(struct pi_state * st) {
    const bool want = !pi_plan_empty(st);
    if (want != st->hook_set) {
        llama_set_graph_hook(st->ctx, want ? pi_hook : NULL, want ? st : NULL);
        st->hook_set = want;
    }
}

void pi_plan_clear(struct pi_state * st) {
    for (int32_t il = 0; il < st->n_layer; ++il) {
        st->layers[il].masked = false;
    }
    pi_patches_free(st);
    free(st->captures);
    st->captures   = NULL;
    st->n_captures = 0;
    st->record     = false;
    st->lens.k     = 0;
    pi_lens_targets_free(st);
    pi_attr_free(st);
    st->gf         = NULL; // removing the hook drops the graph
    pi_update_hook(st);
}

int pi_set_head_mask(struct pi_state * st, int32_t il, const float * mask) {
    if (il < 0 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    struct pi_layer * layer = &st->layers[il];
    ggml_backend_tensor_set(layer->head_mask, mask, 0, ggml_nbytes(layer->head_mask));
    layer->masked = true;
    pi_update_hook(st);
    return 0;
}

int pi_add_capture(struct pi_state * st, const char * name, int32_t il) {
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    st->captures = realloc(st->captures, (st->n_captures + 1) * sizeof(struct pi_capture));
    struct pi_capture * c = &st->captures[st->n_captures++];
    snprintf(c->name, sizeof(c->name), "%s", name);
    c->il = il;
    c->t  = NULL;
    pi_update_hook(st);
    return 0;
}

int pi_add_patch(struct pi_state * st, const char * name, int32_t il, int32_t pos, const float * row, int64_t n) {
    if (strlen(name) >= PI_NAME_MAX) {
        return pi_fail(st, "tensor name too long");
    }
    if (il < -1 || il >= st->n_layer) {
        return pi_fail(st, "layer out of range");
    }
    struct pi_patch p = {0};
    snprintf(p.name, sizeof(p.name), "%s", name);
    p.il  = il;
    p.pos = pos;

    struct ggml_init_params params = { 2*ggml_tensor_overhead(), NULL, true };
    p.ctx = ggml_init(params);
    p.vec = ggml_new_tensor_2d(p.ctx, GGML_TYPE_F32, n, 1);
    p.idx = ggml_new_tensor_1d(p.ctx, GGML_TYPE_I64, 1);
    ggml_format_name(p.vec, "pi_patch_row-%d", st->n_patches);
    ggml_format_name(p.idx, "pi_patch_idx-%d", st->n_patches);
    p.buf = ggml_backend_alloc_ctx_tensors_from_buft(p.ctx, pi_layer_buft(st, il));
    if (p.buf == NULL) {
        ggml_free(p.ctx);
        return pi_fail(st, "could not allocate the patch row");
    }
    ggml_backend_tensor_set(p.vec, row, 0, ggml_nbytes(p.vec));

    st->patches = realloc(st->patches, (st->n_patches + 1) * sizeof(struct pi_patch));
    st->patches[st->n_patches++] = p;
    pi_update_hook(st);
    return 0;
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
    return 0;
}

static void pi_lens_targets_free(struct pi_state * st) {
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
    return 0;
}

static void pi_attr_free(struct pi_state * st) {
    if (st->attr.buf) {
        ggml_backend_buffer_free(st->attr.buf);
        ggml_free(st->attr.ctx);
    }
    free(st->attr.terms);
    memset(&st->attr, 0, sizeof(st->attr));
}

// attribute the logits of `targets` to the tensors (names[i], layers[i]) of the residual stream; by_head (or NULL):
// which terms are attention outputs to split by head as well
int pi_set_attribution(struct pi_state * st, const char ** names, const int32_t * layers, const bool * by_head,
                       int32_t n_terms, const int32_t * targets, int32_t n_targets) {
    pi_attr_free(st);
    struct ggml_init_params params = { ggml_tensor_overhead(), NULL, true };
    st->attr.ctx     = ggml_init(params);
    st->attr.targets = ggml_new_tensor_1d(st->attr.ctx, GGML_TYPE_I32, n_targets);
    ggml_set_name(st->attr.targets, "pi_attribution_targets");
    st->attr.buf = ggml_backend_alloc_ctx_tensors_from_buft(st->attr.ctx, pi_layer_buft(st, -1));
    if (st->attr.buf == NULL) {
        ggml_free(st->attr.ctx);
        memset(&st->attr, 0, sizeof(st->attr));
        return pi_fail(st, "could not allocate the attribution targets");
    }
    ggml_backend_tensor_set(st->attr.targets, targets, 0, ggml_nbytes(st->attr.targets));
    st->attr.terms = calloc(n_terms, sizeof(struct pi_attr_term));
    for (int32_t i = 0; i < n_terms; ++i) {
        snprintf(st->attr.terms[i].name, PI_NAME_MAX, "%s", names[i]);
        st->attr.terms[i].il = layers[i];
        st->attr.terms[i].by_head = by_head != NULL && by_head[i];
    }
    st->attr.n_terms = n_terms;
    pi_update_hook(st);
    return 0;
}

// contribution of term i to the targets after the last decode: n = n_tokens*n_targets floats, token-major;
// returns 1 when the term was not in the graph
int pi_attribution_read(struct pi_state * st, int32_t i, float * dst, int64_t n) {
    if (st->attr.failed) {
        return pi_fail(st, st->attr.failed);
    }
    const struct ggml_tensor * t = st->attr.terms[i].out;
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
    const struct pi_attr_term * term = &st->attr.terms[i];
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

void pi_set_record(struct pi_state * st, bool record) {
    st->record = record;
    st->n_seen = 0;
    pi_update_hook(st);
}

//
// the hook
//

static void pi_record(struct pi_state * st, const struct ggml_tensor * cur, const char * name, int32_t il) {
    if (st->n_seen == st->cap_seen) {
        st->cap_seen = st->cap_seen ? 2*st->cap_seen : 256;
        st->seen = realloc(st->seen, st->cap_seen * sizeof(*st->seen));
    }
    struct pi_seen * seen = &st->seen[st->n_seen++];
    if (il >= 0) {
        snprintf(seen->name, sizeof(seen->name), "%s-%d", name, il);
    } else {
        snprintf(seen->name, sizeof(seen->name), "%s", name);
    }
    for (int d = 0; d < 4; ++d) {
        seen->ne[d] = cur->ne[d];
    }
}

// silence heads by multiplying with the layer's head mask
//   attn_scores: [n_kv, n_tokens, n_head, n_stream], kqv_heads: [n_embd_head_v, n_head, n_tokens, n_stream]
static struct ggml_tensor * pi_mask_heads(struct ggml_context * ctx, struct pi_layer * layer, struct ggml_tensor * cur,
                                          const char * name, int32_t n_head) {
    struct ggml_tensor * masked = NULL;
    if (strcmp(name, "attn_scores") == 0) {
        layer->scores_masked = true;
        masked = ggml_mul(ctx, cur, ggml_reshape_4d(ctx, layer->head_mask, 1, 1, n_head, 1));
    }
    // flash attention layers have no scores: silence the head's output instead (the same thing, as
    // zero weights give a zero output)
    if (strcmp(name, "kqv_heads") == 0 && !layer->scores_masked) {
        masked = ggml_mul(ctx, cur, ggml_reshape_4d(ctx, layer->head_mask, 1, n_head, 1, 1));
    }
    if (masked == NULL) {
        return cur;
    }
    ggml_format_name(masked, "%s (head mask)", cur->name);
    return masked;
}

// forget what the previous graph build did
static void pi_build_begin(struct pi_state * st) {
    for (int32_t i = 0; i < st->n_captures; ++i) {
        st->captures[i].t = NULL;
    }
    for (int32_t i = 0; i < st->n_patches; ++i) {
        st->patches[i].done = false;
    }
    for (int32_t il = 0; il < st->n_layer; ++il) {
        st->layers[il].scores_masked = false;
    }
    for (int32_t slot = 0; slot <= st->n_layer; ++slot) {
        st->lens.in[slot]    = NULL;
        st->lens.ids[slot]   = NULL;
        st->lens.probs[slot] = NULL;
        st->lens.stats[slot] = NULL;
    }
    for (int32_t i = 0; i < st->attr.n_terms; ++i) {
        st->attr.terms[i].in    = NULL;
        st->attr.terms[i].out   = NULL;
        st->attr.terms[i].heads = NULL;
    }
    ggml_reset(st->meta);
    st->final_in      = NULL;
    st->lens.failed   = NULL;
    st->attr.failed   = NULL;
    st->n_seen = 0;
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
static struct ggml_tensor * pi_unembedding(struct ggml_tensor * out) {
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
static void pi_build_lens(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
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
static struct ggml_tensor * pi_split_heads(struct pi_state * st, struct ggml_context * ctx, struct ggml_tensor * term,
                                           int32_t il) {
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
    apart = ggml_mul(ctx, apart, ggml_reshape_4d(ctx, st->layers[il].eye, 1, n_head, n_head, 1));
    struct ggml_tensor * out = ggml_mul_mat(ctx, mm->src[0], ggml_reshape_2d(ctx, apart, d * n_head, n_head * n_tokens));
    out = ggml_reshape_3d(ctx, out, out->ne[0], n_head, n_tokens);
    return pi_heads_replay(ctx, term, mm, out);
}

// at result_output: each term's contribution to the target logits, the final norm's scale frozen
//   contribution = (term / rms(final residual) * norm weight) . unembedding row of the target
static void pi_build_attr(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                          struct ggml_tensor * out) {
    struct pi_attr * attr = &st->attr;
    struct ggml_tensor * mm = pi_unembedding(out);
    struct ggml_tensor * normed = mm ? mm->src[1] : NULL;
    if (st->final_in == NULL || normed == NULL || normed->op != GGML_OP_MUL || normed->src[0]->op != GGML_OP_RMS_NORM ||
        normed->src[0]->src[0] != st->final_in) {
        attr->failed = "logit attribution needs a final RMS norm with a weight before the unembedding";
        return;
    }
    float eps;
    memcpy(&eps, normed->src[0]->op_params, sizeof(float));
    struct ggml_tensor * weight = normed->src[1];
    struct ggml_tensor * rows   = ggml_get_rows(ctx, mm->src[0], attr->targets); // [n_embd, n_targets]
    struct ggml_tensor * rms    = ggml_sqrt(ctx, ggml_scale_bias(ctx, ggml_mean(ctx, ggml_sqr(ctx, st->final_in)), 1.0f, eps));
    for (int32_t i = 0; i < attr->n_terms; ++i) {
        struct pi_attr_term * term = &attr->terms[i];
        if (term->in == NULL || term->in->ne[0] != st->final_in->ne[0]) {
            continue;
        }
        if (!pi_room(gf)) {
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
        struct ggml_tensor * heads = pi_split_heads(st, ctx, term->in, term->il); // [n_embd, n_head, n_tokens]
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

// Some names are given to several tensors of a layer (llama names both the FFN output and the residual
// sum after it "ffn_out"; Qcur is named before and after RoPE): captures and patches act on the first.
static struct ggml_tensor * pi_hook(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * cur,
                                    const char * name, int32_t il, void * user_data) {
    struct pi_state * st = user_data;

    // a graph only grows while it is built: fewer nodes than last time means a new build
    // (llama_decode may build a reserve graph before the real one)
    const int n_nodes = ggml_graph_n_nodes(gf);
    if (n_nodes < st->n_nodes) {
        pi_build_begin(st);
    }
    st->n_nodes = n_nodes;
    st->gf      = gf;

    if (st->record) {
        pi_record(st, cur, name, il);
    }

    if (il >= 0 && il < st->n_layer) {
        struct pi_layer * layer = &st->layers[il];
        if (layer->masked) {
            cur = pi_mask_heads(ctx, layer, cur, name, st->n_head);
        }
    }

    struct ggml_tensor * patched = NULL;
    for (int32_t i = 0; i < st->n_patches; ++i) {
        struct pi_patch * p = &st->patches[i];
        if (!p->active || p->done || p->il != il || strcmp(p->name, name) != 0) {
            continue;
        }
        p->done = true;
        if (p->vec->ne[0] != cur->ne[0] || ggml_nrows(cur) != cur->ne[1]) {
            continue; // checked by the caller against the tensor's width; never write out of bounds
        }
        if (patched == NULL) {
            patched = ggml_dup(ctx, cur);
            ggml_format_name(patched, "%s (copy)", cur->name);
        }
        patched = ggml_set_rows(ctx, patched, p->vec, p->idx);
    }
    if (patched != NULL) {
        ggml_format_name(patched, "%s (patched)", cur->name);
        cur = patched;
    }

    if (st->lens.k > 0 || st->attr.n_terms > 0) {
        if (il == st->n_layer - 1 && st->final_in == NULL && strcmp(name, "l_out") == 0) {
            st->final_in = cur;
        }
        if (il >= -1 && il < st->n_layer && st->lens.k > 0 && st->lens.in[il + 1] == NULL && strcmp(name, st->lens.name) == 0) {
            st->lens.in[il + 1] = cur;
        }
        for (int32_t i = 0; i < st->attr.n_terms; ++i) {
            struct pi_attr_term * term = &st->attr.terms[i];
            if (term->in == NULL && term->il == il && strcmp(term->name, name) == 0) {
                term->in = cur;
            }
        }
        if (il == -1 && strcmp(name, "result_output") == 0) {
            if (st->lens.k > 0) {
                pi_build_lens(st, st->meta, gf, cur);
            }
            if (st->attr.n_terms > 0) {
                pi_build_attr(st, st->meta, gf, cur);
            }
        }
    }

    for (int32_t i = 0; i < st->n_captures; ++i) {
        struct pi_capture * c = &st->captures[i];
        if (c->t != NULL || c->il != il || strcmp(c->name, name) != 0) {
            continue;
        }
        struct ggml_tensor * t = cur;
        if (ggml_is_view(t) || !ggml_is_contiguous(t)) {
            t = ggml_cont(ctx, t);
            ggml_format_name(t, "%s (capture)", cur->name);
        }
        ggml_set_output(t);
        ggml_build_forward_expand(gf, t);
        c->t = t;
    }

    return cur;
}

//
// decoding
//

int32_t pi_decode(struct pi_state * st, const llama_token * tokens, int32_t n_tokens, int32_t pos0, bool all_logits) {
    // llama_decode asserts on these; answer with an error instead
    if (n_tokens < 1 || n_tokens > (int32_t) llama_n_batch(st->ctx) || pos0 < 0 ||
        pos0 + n_tokens > (int32_t) llama_n_ctx(st->ctx)) {
        pi_fail(st, "batch does not fit the context");
        return -100;
    }
    pi_build_begin(st);
    st->n_nodes = 0;
    for (int32_t i = 0; i < st->n_patches; ++i) {
        struct pi_patch * p = &st->patches[i];
        p->active = p->pos >= pos0 && p->pos < pos0 + n_tokens;
        if (p->active) {
            const int64_t row = p->pos - pos0;
            ggml_backend_tensor_set(p->idx, &row, 0, sizeof(row));
        }
    }
    struct llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int32_t i = 0; i < n_tokens; ++i) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = pos0 + i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = all_logits || i == n_tokens - 1;
    }
    batch.n_tokens = n_tokens;

    const int32_t ret = llama_decode(st->ctx, batch);
    llama_batch_free(batch);
    if (ret == 0) {
        llama_synchronize(st->ctx);
    }
    return ret;
}

//
// results of the last decode
//

int32_t pi_n_seen(const struct pi_state * st) {
    return st->n_seen;
}

const char * pi_seen_name(const struct pi_state * st, int32_t i, int64_t * ne) {
    for (int d = 0; d < 4; ++d) {
        ne[d] = st->seen[i].ne[d];
    }
    return st->seen[i].name;
}

int32_t pi_n_captures(const struct pi_state * st) {
    return st->n_captures;
}

// shape of capture i in ggml order (ne[0] fastest); returns false when the tensor was not in the graph
bool pi_capture_shape(const struct pi_state * st, int32_t i, int64_t * ne) {
    const struct ggml_tensor * t = st->captures[i].t;
    if (t == NULL) {
        return false;
    }
    for (int d = 0; d < 4; ++d) {
        ne[d] = t->ne[d];
    }
    return true;
}

// copy capture i to dst (room for n_dst floats) as float32, keeping the first n0 of ne[0] elements of every row
int pi_capture_read(struct pi_state * st, int32_t i, float * dst, int64_t n_dst, int64_t n0) {
    const struct ggml_tensor * t = st->captures[i].t;
    if (t == NULL) {
        return pi_fail(st, "tensor was not captured");
    }
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
