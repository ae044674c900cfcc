// pyinterp native layer: what its files share (not part of the API).
//
// The core (state.c, hook.c, decode.c) owns the model, the context and the graph-build hook, and knows no
// feature. Every feature is a *recipe*: one C file that owns its state and tells the core, through one
// struct pi_recipe, what to do at each step of a run (table in recipes.c, in the order the hook applies them):
//   record.c       the names and shapes of every tensor offered to the hook
//   freeze.c       the local replacement model: norms and attention frozen at given values
//   ops.c          the op table: captures and interventions (mul, set, add, inject)
//   sae.c          sparse autoencoders encoding (and editing) a tensor
//   transcoder.c   transcoders encoding an MLP's input and replacing (or editing) its output
//   lens.c         the logit lens, built at the unembedding
//   attribution.c  direct logit attribution, built at the unembedding
// A feature file includes this header only and calls no other feature's functions; it uses the services
// declared below (errors, devices, the hook's state, graph room, device pools, rows of the model file).
//
// Adding a readout (or an intervention):
//   1. pyinterp/csrc/<name>.c: its state struct, its API functions (set it up, read its results; each
//      finds its state with pi_self(st, &pi_recipe_<name>)), and `const struct pi_recipe pi_recipe_<name>`.
//   2. its API declarations in interp.h (cffi reads them from there);
//   3. two lines in recipes.c (its extern and its table entry) and one in CMakeLists.txt's source list;
//   4. Python: an analysis module (setup before Model._forward's decode, read after) and its calls in
//      pyinterp/backend.py (see docs/internals.md).
// Nothing in the core or in another recipe changes: pi_state_new allocates its state, pi_plan_clear and
// pi_state_free clear and release it, the hook is set while any recipe is active, and every decode and
// graph build goes through it.
#pragma once

#include "interp.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI_NAME_MAX 64
#define PI_META_TENSORS 16384   // tensors the hook may add to one graph
#define PI_ROOM 64              // graph nodes one layer's readout (lens, attribution term, SAE) may add, at most

struct pi_state;

// the decode about to run: n_seq sequences one after the other, sequence s of n_tokens[s] tokens at positions
// pos0[s].. in llama.cpp sequence seq_ids[s]; the logits of every token (all_logits) or of each sequence's last
struct pi_batch {
    int32_t n_seq;
    const int32_t * n_tokens;
    const int32_t * pos0;
    const int32_t * seq_ids;
    bool all_logits;
};

// One feature. Every function gets the state and `self`, the recipe's own zeroed state of `size` bytes;
// clear and active are required, the others may be NULL. Tensors a recipe adds to a graph go in `ctx`
// (reset at every build). Reading results is no slot: each recipe's read functions are its own API.
struct pi_recipe {
    const char * name;
    size_t size;
    // at pi_state_new: long-lived resources; false: the state cannot be made (release still runs)
    bool (*init)(struct pi_state * st, void * self);
    // pi_plan_clear and pi_state_free: drop what the plan asked of it (inactive afterwards)
    void (*clear)(struct pi_state * st, void * self);
    // pi_state_free, after clear: free what init made and anything kept across plans
    void (*release)(struct pi_state * st, void * self);
    // whether it has work in the next graph builds: the hook is set while any recipe is active
    bool (*active)(const struct pi_state * st, const void * self);
    // before every decode (even when inactive): device data for this batch; 0, or -1 with the error set
    int  (*prepare)(struct pi_state * st, void * self, const struct pi_batch * batch);
    // a graph build begins: forget the tensors of the last one
    void (*begin)(struct pi_state * st, void * self);
    // every tensor llama.cpp names while it builds the graph, in order, as the recipes before left it: match
    // its records, apply them, note what it reads later; returns what takes cur's place (cur: unchanged)
    struct ggml_tensor * (*tensor)(struct pi_state * st, void * self, struct ggml_context * ctx, struct ggml_cgraph * gf,
                                   struct ggml_tensor * cur, const char * name, int32_t il);
    // at result_output (the logits, the last tensor the hook is offered): outputs built from the whole graph
    void (*output)(struct pi_state * st, void * self, struct ggml_context * ctx, struct ggml_cgraph * gf,
                   struct ggml_tensor * out);
};

// the recipes, in the order the hook applies them (recipes.c)
extern const struct pi_recipe * const pi_recipes[];
extern const int32_t pi_n_recipes;
// recipe's state in st
void * pi_self(const struct pi_state * st, const struct pi_recipe * recipe);

struct pi_state {
    struct llama_context * ctx;
    const struct llama_model * model;
    int32_t n_layer;
    int32_t n_head;

    void ** self;                   // [pi_n_recipes] each recipe's state

    int32_t n_ubatch;               // tokens of the current decode (one ubatch, all sequences)
    int32_t n_outputs;              // of them, those whose logits are kept

    struct ggml_context * meta;     // the tensors the hook adds to a graph (reset at every build): llama.cpp's graph
                                    // context has room for the model's own only
    struct ggml_cgraph * gf;        // the graph of the last build (valid until the next one)
    char line[1024];                // pi_graph_node_line's result

    int n_nodes;                    // nodes of the graph being built, at the last hook call
    int32_t n_builds;               // graphs built while the hook was set

    struct ggml_tensor * final_in;  // the last layer's l_out, as the recipes left it: where the model's own unembedding starts
    const char * build_failed;      // why a recipe could not do its work in the last build (NULL: it could)
    struct ggml_tensor * injected;  // a tensor that replaced one without reading it (PI_OP_INJECT; NULL: none):
                                    // what only led to the replaced one is left out of the computation
    int32_t n_skipped;              // nodes of the last build left out of the computation

    bool truncate;                  // compute only what the kept outputs need (pi_set_truncate)
    const struct ggml_tensor * last_read; // the latest model tensor a kept output reads, in this build
    struct ggml_tensor ** kept;     // [n_kept] outputs of captures and SAEs in this build (room for cap_kept)
    int32_t n_kept;
    int32_t cap_kept;

    bool hook_set;
    char error[256];
};

// services (state.c): errors, devices, the hook
int  pi_fail(struct pi_state * st, const char * msg);
ggml_backend_buffer_type_t pi_layer_buft(const struct pi_state * st, int32_t il);
// set or unset the hook as the recipes are active or not; call after a recipe's records change
void pi_update_hook(struct pi_state * st);
// the next decode builds a new graph: call when what a recipe would add to it changed
void pi_drop_graph(struct pi_state * st);

// read a graph output to the host as float32, keeping the first n0 elements of every row (decode.c)
int pi_read_f32(struct pi_state * st, const struct ggml_tensor * t, float * dst, int64_t n_dst, int64_t n0);

// the hook llama.cpp calls while it builds a graph, and graph helpers (hook.c)
struct ggml_tensor * pi_hook(struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * cur,
                             const char * name, int32_t il, void * user_data);
extern const char * PI_NO_ROOM;
// the graph llama.cpp allocated (for its own nodes) has room for n more
bool pi_room(struct ggml_cgraph * gf, int n);
// note that the graph output `out` reads the model's tensor `read` (a capture, an SAE): a truncated pass
// computes what such outputs need and nothing after the latest tensor they read
void pi_keep(struct pi_state * st, const struct ggml_tensor * read, struct ggml_tensor * out);
// f = act(pre), pre [d, n]: enum pi_sae_activation (relu; jumprelu over threshold [d]; topk keeping k per column)
struct ggml_tensor * pi_sparse_activate(struct ggml_context * ctx, int32_t activation, struct ggml_tensor * pre,
                                        struct ggml_tensor * threshold, int32_t k);
// the unembedding matrix product under result_output (after it may come soft-capping), or NULL
struct ggml_tensor * pi_unembedding(struct ggml_tensor * out);

// device memory kept across runs for one buffer type; tensors are placed in it from offset 0 each time (pool.c)
#define PI_MAX_POOLS 8          // buffer types (devices) one set of pools may hold
struct pi_pool {
    ggml_backend_buffer_type_t buft;
    ggml_backend_buffer_t      buf;
};
// place `tensors` (of a no_alloc context) in the pools of their buffer types, growing a pool when it is too small
bool pi_pools_place(struct pi_pool * pools, struct ggml_tensor ** tensors, const ggml_backend_buffer_type_t * bufts,
                    int32_t n);
void pi_pools_free(struct pi_pool * pools);
// allocate the tensors of the no_alloc context ctx in one buffer of buft and copy data[i] into tensors[i] (either
// NULL: nothing to copy); NULL when the buffer cannot be allocated
ggml_backend_buffer_t pi_alloc_upload(struct ggml_context * ctx, ggml_backend_buffer_type_t buft,
                                      struct ggml_tensor * const * tensors, const void * const * data, int n);

// rows of a model matrix from the model file (rows.c)
float * pi_read_rows(struct pi_state * st, const char * path, const char * name, const int32_t * ids, int32_t n_ids,
                     int64_t * width);
