// pyinterp native layer; see interp.c. Declared again, for cffi, in pyinterp/_ffi.py.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#define PI_API __attribute__((visibility("default")))

struct pi_state;

PI_API struct llama_model   * pi_model_load(const char * path, int32_t n_gpu_layers, const char * rpc_endpoint);
PI_API bool                   pi_has_rpc(void);
PI_API void                   pi_rpc_serve(const char * endpoint, int32_t n_threads);
PI_API struct llama_context * pi_context_new(struct llama_model * model, uint32_t n_ctx, int32_t n_threads, int32_t flash_attn,
                                                   int32_t type_k, int32_t type_v);

PI_API struct pi_state * pi_state_new(struct llama_context * ctx);
PI_API void              pi_state_free(struct pi_state * st);
PI_API const char *      pi_last_error(const struct pi_state * st);

PI_API void pi_plan_clear   (struct pi_state * st);
PI_API int  pi_set_head_mask(struct pi_state * st, int32_t il, const float * mask);
PI_API int  pi_add_capture  (struct pi_state * st, const char * name, int32_t il);
PI_API int  pi_add_patch    (struct pi_state * st, const char * name, int32_t il, int32_t pos, const float * row, int64_t n);
PI_API int  pi_set_lens     (struct pi_state * st, const char * name, bool norm, int32_t k);
PI_API int  pi_set_lens_targets(struct pi_state * st, const int32_t * targets, int32_t n_targets,
                             const int32_t * positions, int32_t n_positions);
PI_API int  pi_set_attribution(struct pi_state * st, const char ** names, const int32_t * layers, const bool * by_head,
                              int32_t n_terms, const int32_t * targets, int32_t n_targets);
PI_API void pi_set_record   (struct pi_state * st, bool record);

PI_API int32_t pi_decode(struct pi_state * st, const llama_token * tokens, int32_t n_tokens, int32_t pos0, bool all_logits);

PI_API int32_t      pi_n_seen       (const struct pi_state * st);
PI_API const char * pi_seen_name    (const struct pi_state * st, int32_t i, int64_t * ne);
PI_API int32_t      pi_n_captures   (const struct pi_state * st);
PI_API bool         pi_capture_shape(const struct pi_state * st, int32_t i, int64_t * ne);
PI_API int          pi_capture_read (struct pi_state * st, int32_t i, float * dst, int64_t n_dst, int64_t n0);
PI_API int          pi_lens_read    (struct pi_state * st, int32_t il, int32_t * ids, float * probs, int64_t n);
PI_API int          pi_attribution_read(struct pi_state * st, int32_t i, float * dst, int64_t n);
PI_API int          pi_attribution_heads_read(struct pi_state * st, int32_t i, float * dst, int64_t n);
PI_API int          pi_lens_targets_read(struct pi_state * st, int32_t il, float * dst, int64_t n);
PI_API int32_t      pi_graph_n_nodes  (const struct pi_state * st);
PI_API const char * pi_graph_node_line(struct pi_state * st, int32_t i);
