// pyinterp native layer: device memory kept across runs, one buffer per buffer type (device), that a set of
// tensors is placed in from offset 0 each time it changes; and one buffer of uploaded weights (SAEs, transcoders).

#include "internal.h"

bool pi_pools_place(struct pi_pool * pools, struct ggml_tensor ** tensors, const ggml_backend_buffer_type_t * bufts,
                    int32_t n) {
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

void pi_pools_free(struct pi_pool * pools) {
    for (int i = 0; i < PI_MAX_POOLS; ++i) {
        if (pools[i].buf) {
            ggml_backend_buffer_free(pools[i].buf);
        }
        pools[i].buf  = NULL;
        pools[i].buft = NULL;
    }
}

ggml_backend_buffer_t pi_alloc_upload(struct ggml_context * ctx, ggml_backend_buffer_type_t buft,
                                      struct ggml_tensor * const * tensors, const void * const * data, int n) {
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    if (buf == NULL) {
        return NULL;
    }
    for (int i = 0; i < n; ++i) {
        if (tensors[i] != NULL && data[i] != NULL) {
            ggml_backend_tensor_set(tensors[i], data[i], 0, ggml_nbytes(tensors[i]));
        }
    }
    return buf;
}
