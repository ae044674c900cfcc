// pyinterp native layer: the state shared by its files (not part of the API).
#pragma once

#include "interp.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI_NAME_MAX 64
#define PI_META_TENSORS 16384   // tensors the hook may add to one graph
#define PI_ROOM 64              // graph nodes one layer's lens or attribution term may add, at most
#define PI_OP_ROOM 16           // graph nodes one op may add, at most
#define PI_MAX_POOLS 8          // buffer types (devices) the ops' data may live on

// device memory kept across runs for one buffer type; tensors are placed in it from offset 0 each time
struct pi_pool {
    ggml_backend_buffer_type_t buft;
    ggml_backend_buffer_t      buf;
};

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

struct pi_layer {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    struct ggml_tensor * eye;       // [1, n_head, n_head] F32 identity: spreads the heads apart (per-head attribution)
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
    struct ggml_context * ctx;      // owns rows
    ggml_backend_buffer_t buf;      // on the output device
    struct ggml_tensor * rows;      // [n_embd, n_targets] F32 the targets' unembedding rows, read from the model file
    char rows_of[PI_NAME_MAX];      // the matrix they are rows of (output.weight, or token_embd.weight when tied)
    const char * failed;            // why the attribution could not be built (NULL: it was)
};

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

    struct pi_op * ops;
    int32_t n_ops;
    bool    ops_uploaded;           // the ops' data is in the ops pool
    struct ggml_context * ops_ctx;  // the ops' data tensors
    struct ggml_context * rows_ctx; // the ops' row tensors
    struct pi_pool ops_pool[PI_MAX_POOLS];
    struct pi_pool rows_pool[PI_MAX_POOLS];
    int32_t n_ubatch;               // tokens of the current ubatch (all sequences)
    int32_t n_outputs;              // of them, those whose logits are kept

    // every (name, il) offered to the hook during the last build, when recording
    bool record;
    struct pi_seen * seen;
    int32_t n_seen;
    int32_t cap_seen;

    struct pi_sae_use * saes;
    int32_t n_saes;

    struct pi_lens lens;            // active when lens.k > 0
    struct pi_attr attr;            // active when attr.n_terms > 0
    struct ggml_tensor * final_in;  // the last layer's l_out: where the model's own unembedding starts

    struct ggml_context * meta;     // the tensors the hook adds to a graph (reset at every build): llama.cpp's graph
                                    // context has room for the model's own only
    struct ggml_cgraph * gf;        // the graph of the last build (valid until the next one)
    char line[1024];                // pi_graph_node_line's result

    int n_nodes;                    // nodes of the graph being built, at the last hook call
    int32_t n_builds;               // graphs built while the hook was set

    const char * build_failed;      // why the hook could not apply an op in the last build (NULL: it could)
    struct ggml_tensor * injected;  // what a PI_OP_INJECT put in the last build (NULL: none)
    int32_t n_skipped;              // nodes of the last build left out of the computation

    bool hook_set;
    char error[256];
};

int  pi_fail(struct pi_state * st, const char * msg);
ggml_backend_buffer_type_t pi_layer_buft(const struct pi_state * st, int32_t il);

// state.c
void pi_update_hook(struct pi_state * st);
void pi_drop_graph(struct pi_state * st);

// ops.c
void pi_ops_free(struct pi_state * st);
int  pi_ops_prepare(struct pi_state * st, int32_t n_seq, const int32_t * n_tokens, const int32_t * pos0,
                    const int32_t * seq_ids, bool all_logits);
struct ggml_tensor * pi_op_apply(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                 struct pi_op * op, struct ggml_tensor * cur);
bool pi_pools_place(struct pi_state * st, struct pi_pool * pools, struct ggml_tensor ** tensors,
                    const ggml_backend_buffer_type_t * bufts, int32_t n);

// lens.c
void pi_lens_targets_free(struct pi_state * st);
void pi_build_lens(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * out);
bool pi_room(struct ggml_cgraph * gf);
struct ggml_tensor * pi_unembedding(struct ggml_tensor * out);
extern const char * PI_NO_ROOM;

// attribution.c
void pi_attr_free(struct pi_state * st);
bool pi_weights_run(const struct ggml_tensor * node);
void pi_build_attr(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * out);

// rows.c
float * pi_read_rows(struct pi_state * st, const char * path, const char * name, const int32_t * ids, int32_t n_ids,
                     int64_t * width);

// sae.c
void pi_saes_free(struct pi_state * st);
struct ggml_tensor * pi_sae_apply(struct pi_state * st, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                  struct pi_sae_use * use, struct ggml_tensor * cur);

// hook.c
struct ggml_tensor * pi_hook(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * cur,
                             const char * name, int32_t il, void * user_data);
void pi_build_begin(struct pi_state * st);
