// pyinterp native layer: the C API. pyinterp/_ffi.py reads this file to declare it to cffi, so it is
// declared once; keep it to plain declarations (one per line group, no macros other than PI_API). Every feature
// (a recipe: see internal.h) declares its functions in a group of its own, which names its file. The op kinds
// are declared once too, in enum pi_op_kind: pyinterp/interventions/base.py reads their names from this file.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#define PI_API __attribute__((visibility("default")))

struct pi_state;

// model, context and the state of the hook (state.c); pi_plan_clear drops what every feature was asked to do
// (the ops, the SAEs and transcoders attached, the lens, the attribution, the record)
PI_API struct llama_model   * pi_model_load(const char * path, int32_t n_gpu_layers, const char * rpc_endpoint);
PI_API bool                   pi_has_rpc(void);
PI_API void                   pi_rpc_serve(const char * endpoint, int32_t n_threads);
PI_API struct llama_context * pi_context_new(struct llama_model * model, uint32_t n_ctx, int32_t n_threads, int32_t flash_attn,
                                             int32_t type_k, int32_t type_v, int32_t n_seq_max);

PI_API struct pi_state * pi_state_new(struct llama_context * ctx);
PI_API void              pi_state_free(struct pi_state * st);
PI_API const char *      pi_last_error(const struct pi_state * st);
PI_API void              pi_plan_clear(struct pi_state * st);

// the op table (ops.c): what the graph-build hook does to the tensor `name` of layer `il` (-1: outside the
// layers) in sequence `seq` (-1: every sequence), at the token positions `positions` (NULL: every token).
//   PI_OP_CAPTURE  keep the tensor (its rows at the positions) as a graph output
//   PI_OP_MUL      multiply by `data`, broadcast over the tensor (per token: over one token's slice)
//   PI_OP_SET      replace rows by rows of `data`
//   PI_OP_ADD      add `data` (broadcast, or rows of it)
//   PI_OP_INJECT   replace the whole tensor by rows of `data` (per_row, every sequence, every token) without
//                  reading it; whatever only led to it or to other results that need none of it (the layers
//                  before, their KV cache writes) is not computed. The sequences' KV cells of those layers
//                  are left unwritten, so only sequences dropped after the decode may use it.
// data has the ggml shape ne[4]; per_row: data is [width, n] and the row for position p is row i where
// positions[i] == p, or row p when positions is NULL. Without per_row, data broadcasts over the tensor, or
// with a sequence or positions over one token's slice of it ([.., n_tokens] tensors). Ops apply in the
// order they were added. Results: pi_op_shape, pi_op_read.
enum pi_op_kind {
    PI_OP_CAPTURE = 0,
    PI_OP_MUL     = 1,
    PI_OP_SET     = 2,
    PI_OP_ADD     = 3,
    PI_OP_INJECT  = 4,
};

PI_API int32_t pi_op_add    (struct pi_state * st, int32_t kind, const char * name, int32_t il, int32_t seq,
                             const int32_t * positions, int32_t n_positions, const float * data, const int64_t * ne,
                             bool per_row);
// shape of what op `op` captured in the last graph, in ggml order (ne[0] fastest); false when it captured nothing
PI_API bool    pi_op_shape  (const struct pi_state * st, int32_t op, int64_t * ne);
// copy what op `op` captured to dst (room for n_dst floats) as float32, keeping the first n0 of ne[0] elements
// of every row
PI_API int     pi_op_read   (struct pi_state * st, int32_t op, float * dst, int64_t n_dst, int64_t n0);

// sparse autoencoders in the graph (sae.c). pi_sae_load keeps an SAE's weights on the device of layer il
// until pi_sae_free: w_enc_t [d_sae][d_in] (W_enc transposed), w_dec [d_sae][d_in], w_dec_t [d_in][d_sae],
// b_enc [d_sae], b_dec [d_in], threshold [d_sae] (JumpReLU, else NULL). Per token x:
//   f = act((x - b_dec if apply_b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec
// act: relu; jumprelu: relu(pre) where pre > threshold; topk: relu of the k largest pre, 0 elsewhere.
// pi_sae_attach (until pi_plan_clear) encodes the tensor `name` of layer il in every decode: the top_k
// features of every token, and per token |x - x_hat|^2, |x|^2, x.x_hat, |x_hat|^2 and the number of active
// features. With edits, feature
// edit_ids[i] becomes edit_values[i] (or is multiplied by it, edit_scale) and the tensor becomes
//   x + (f' - f) W_dec
// so the SAE's reconstruction error stays in and only the edited features change.
enum pi_sae_activation {
    PI_SAE_RELU     = 0,
    PI_SAE_JUMPRELU = 1,
    PI_SAE_TOPK     = 2,
};

struct pi_sae;

PI_API struct pi_sae * pi_sae_load(struct pi_state * st, int32_t il, int32_t d_in, int32_t d_sae, const float * w_enc_t,
                                   const float * b_enc, const float * w_dec, const float * w_dec_t, const float * b_dec,
                                   const float * threshold, int32_t activation, int32_t k, bool apply_b_dec);
PI_API void    pi_sae_free  (struct pi_sae * sae);
PI_API int32_t pi_sae_attach(struct pi_state * st, struct pi_sae * sae, const char * name, int32_t il, int32_t top_k,
                             const int32_t * edit_ids, const float * edit_values, int32_t n_edits, bool edit_scale);
PI_API int     pi_sae_read  (struct pi_state * st, int32_t i, int32_t * ids, float * values, float * stats, int64_t n_rows);

// the local replacement model of one prompt (freeze.c). pi_norm_measure: the next decodes output the scale
// 1/rms(x) of every token at the norm `name` of layer il (a tensor llama.cpp builds as rms_norm(x) * weight), read
// [n_tokens] with pi_norm_scale_read. pi_freeze_norm makes that norm x * scales[pos] * weight; pi_freeze_attention
// makes layer il's attention output (kqv_out) the given weights [n_head][n_pos query][n_pos key] times the layer's
// own V; pi_freeze_rows replaces the tensor `name` of layer il by rows [n_rows][width], row i for token i of the
// decode (each sequence's own), without computing what only led to it. A frozen decode holds sequences of the
// same n_pos tokens from position 0, their norms and attention frozen alike. Until pi_plan_clear.
PI_API int32_t pi_norm_measure    (struct pi_state * st, const char * name, int32_t il);
PI_API int     pi_norm_scale_read (struct pi_state * st, int32_t i, float * dst, int64_t n);
PI_API int     pi_freeze_norm     (struct pi_state * st, const char * name, int32_t il, const float * scales, int32_t n_pos);
PI_API int     pi_freeze_attention(struct pi_state * st, int32_t il, const float * weights, int32_t n_head, int32_t n_pos);
PI_API int     pi_freeze_rows     (struct pi_state * st, const char * name, int32_t il, const float * rows, int64_t width,
                                   int64_t n_rows, int32_t n_pos);

// transcoders in the graph (transcoder.c): sparse replacements of an MLP. pi_tc_load keeps the weights of the
// transcoder of layer il on that layer's device until pi_tc_free: w_enc_t [d_tc][d_model] (W_enc transposed),
// b_enc [d_tc], w_dec_t [n_out][d_model][d_tc] (each decoder transposed; decoder j writes to layer il + j: a
// cross-layer transcoder has n_out > 1), b_dec [d_model], threshold [d_tc] (JumpReLU, else NULL), w_skip_t
// [d_model][d_model] (W_skip transposed, skip transcoders, else NULL). Activations: enum pi_sae_activation.
// pi_tc_attach (until pi_plan_clear) encodes `in_name`-il in every decode, f = act(x W_enc + b_enc), and at
// `out_name`-m (the MLP output, m = il .. il + n_out - 1) of each attached transcoder of layer m computes
//   y = sum over the attached transcoders l <= m writing to m of f_l W_dec_l[m - l] + b_dec (+ x_m W_skip)
// and per token |out - y|^2, |out|^2 and the number of active features of layer m. Edits: feature
// edit_ids[i] of layer il becomes edit_values[i] (or is multiplied by it, edit_scale), a change d; the layer's
// output then becomes, by mode: PI_TC_ENCODE out (unchanged, edits ignored), PI_TC_KEEP_ERROR out + sum d W_dec,
// PI_TC_DROP_ERROR y + sum d W_dec. One transcoder per layer; pi_tc_read reads the top_k features of every token
// and the statistics of the last decode.
enum pi_tc_mode {
    PI_TC_ENCODE     = 0,
    PI_TC_KEEP_ERROR = 1,
    PI_TC_DROP_ERROR = 2,
};

struct pi_transcoder;

PI_API struct pi_transcoder * pi_tc_load(struct pi_state * st, int32_t il, int32_t d_model, int32_t d_tc, int32_t n_out,
                                         const float * w_enc_t, const float * b_enc, const float * w_dec_t,
                                         const float * b_dec, const float * threshold, const float * w_skip_t,
                                         int32_t activation, int32_t k);
PI_API void    pi_tc_free  (struct pi_transcoder * tc);
PI_API int32_t pi_tc_attach(struct pi_state * st, struct pi_transcoder * tc, const char * in_name, const char * out_name,
                            int32_t top_k, int32_t mode, const int32_t * edit_ids, const float * edit_values,
                            int32_t n_edits, bool edit_scale);
// ids and values [n_rows, top_k] (unordered), stats [n_rows, 3]: |out - y|^2, |out|^2, active features
PI_API int     pi_tc_read  (struct pi_state * st, int32_t i, int32_t * ids, float * values, float * stats, int64_t n_rows);

// the logit lens (lens.c), results of the last decode per layer
// (only the rows asked for are unembedded)
PI_API int  pi_set_lens         (struct pi_state * st, const char * name, bool norm, int32_t k, float temp,
                                 bool entropy, const int32_t * rows, const int32_t * out_rows, int32_t n_rows);
PI_API int  pi_set_lens_targets (struct pi_state * st, const int32_t * targets, int32_t n_targets);
PI_API int  pi_lens_read        (struct pi_state * st, int32_t il, int32_t * ids, float * probs, int64_t n);
PI_API int  pi_lens_targets_read(struct pi_state * st, int32_t il, float * dst, int64_t n);
PI_API int  pi_lens_entropy_read(struct pi_state * st, int32_t il, float * dst, int64_t n);

// direct logit attribution (attribution.c), results of the last decode per term
PI_API int  pi_set_attribution       (struct pi_state * st, const char * model_path, const char ** names,
                                      const int32_t * layers, const bool * by_head, int32_t n_terms,
                                      const int32_t * targets, int32_t n_targets);
PI_API int  pi_attribution_read      (struct pi_state * st, int32_t i, float * dst, int64_t n);
PI_API int  pi_attribution_heads_read(struct pi_state * st, int32_t i, float * dst, int64_t n);

// the record (record.c): the name and shape of every tensor offered to the hook in the last build
PI_API void         pi_set_record(struct pi_state * st, bool record);
PI_API int32_t      pi_n_seen    (const struct pi_state * st);
PI_API const char * pi_seen_name (const struct pi_state * st, int32_t i, int64_t * ne);

// decoding (decode.c): n_seq sequences one after the other in tokens, sequence i of n_tokens[i] tokens at
// positions pos0[i].. in llama.cpp sequence seq_ids[i]; logits of every token (all_logits) or of each
// sequence's last
PI_API int32_t pi_decode(struct pi_state * st, const llama_token * tokens, int32_t n_seq, const int32_t * n_tokens,
                         const int32_t * pos0, const int32_t * seq_ids, bool all_logits);
PI_API int32_t pi_n_builds(const struct pi_state * st);
// graph nodes the last build left out of the computation (PI_OP_INJECT, pi_set_truncate; hook.c)
PI_API int32_t pi_n_skipped(const struct pi_state * st);
// truncated passes (hook.c): compute what the captures and SAEs need and nothing after the latest tensor they
// read (the later layers, their KV cache writes, the logits, which are then not computed); until set false
PI_API void    pi_set_truncate(struct pi_state * st, bool truncate);

// the graph of the last decode (hook.c)
PI_API int32_t      pi_graph_n_nodes  (const struct pi_state * st);
PI_API const char * pi_graph_node_line(struct pi_state * st, int32_t i);
