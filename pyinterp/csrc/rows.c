// pyinterp native layer: rows of a model matrix read from the model's GGUF file, dequantized to F32.
//
// A backend may keep a weight in a layout only its own matrix product reads: the CPU backend repacks Q4_0, Q4_K,
// IQ4_NL, MXFP4, Q2_K (x86) and Q5_K, Q6_K, Q8_0 (ARM) matrices with a multiple of 8 (or 4) rows into interleaved
// blocks (its CPU_REPACK buffer type), which no backend can get_rows from or copy back; CUDA has no get_rows for
// the K-quants. So the rows an analysis needs (the unembedding rows of its targets) come from the file, dequantized
// by ggml's own type functions: the values the model's matrix product multiplies by.

#include "internal.h"

#include "gguf.h"

#include <limits.h>
#include <sys/types.h>

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

#ifdef _WIN32
#define pi_off_t  __int64
#define pi_fseek  _fseeki64
#else
#define pi_off_t  off_t
#define pi_fseek  fseeko
#endif

// the file of the split model `path` (its first part) that holds tensor `name`: its gguf context and metadata
// context (shapes), or NULL when no part has it; *part: the part's path
static struct gguf_context * pi_gguf_find(const char * path, const char * name, struct ggml_context ** meta,
                                          char * part, size_t part_size) {
    struct gguf_init_params params = { true, meta };
    struct gguf_context * g = gguf_init_from_file(path, params);
    if (g == NULL) {
        return NULL;
    }
    snprintf(part, part_size, "%s", path);
    if (gguf_find_tensor(g, name) >= 0) {
        return g;
    }
    const int64_t key = gguf_find_key(g, "split.count");
    const int32_t n_split = key >= 0 ? gguf_get_val_u16(g, key) : 1;
    gguf_free(g);
    ggml_free(*meta);
    char prefix[PATH_MAX];
    if (n_split < 2 || llama_split_prefix(prefix, sizeof(prefix), path, 1, n_split) == 0) {
        return NULL;
    }
    for (int32_t i = 2; i <= n_split; ++i) {
        llama_split_path(part, part_size, prefix, i, n_split);
        g = gguf_init_from_file(part, params);
        if (g != NULL && gguf_find_tensor(g, name) >= 0) {
            return g;
        }
        if (g != NULL) {
            gguf_free(g);
            ggml_free(*meta);
        }
    }
    return NULL;
}

// rows `ids` (n_ids of them) of the 2-D tensor `name` of the model file `path`, as F32: rows[n_ids][*width]
// (malloc'd, the caller frees), or NULL with st->error set
float * pi_read_rows(struct pi_state * st, const char * path, const char * name, const int32_t * ids, int32_t n_ids,
                     int64_t * width) {
    struct ggml_context * meta = NULL;
    char part[PATH_MAX];
    struct gguf_context * g = pi_gguf_find(path, name, &meta, part, sizeof(part));
    if (g == NULL) {
        snprintf(st->error, sizeof(st->error), "the model file %s has no tensor %s", path, name);
        return NULL;
    }
    const struct ggml_tensor * t = ggml_get_tensor(meta, name);
    const struct ggml_type_traits * traits = ggml_get_type_traits(t->type);
    const size_t row_size = ggml_row_size(t->type, t->ne[0]);
    const pi_off_t start = (pi_off_t) (gguf_get_data_offset(g) + gguf_get_tensor_offset(g, gguf_find_tensor(g, name)));
    float * rows = NULL;
    void * raw = NULL;
    FILE * f = NULL;
    if (ggml_n_dims(t) != 2 || (t->type != GGML_TYPE_F32 && traits->to_float == NULL)) {
        snprintf(st->error, sizeof(st->error), "%s is not a matrix pyinterp can read (type %s)", name, ggml_type_name(t->type));
        goto done;
    }
    for (int32_t i = 0; i < n_ids; ++i) {
        if (ids[i] < 0 || ids[i] >= t->ne[1]) {
            snprintf(st->error, sizeof(st->error), "row %d out of range for %s (%lld rows)", ids[i], name, (long long) t->ne[1]);
            goto done;
        }
    }
    f = fopen(part, "rb");
    raw = malloc(row_size);
    rows = malloc((size_t) n_ids * t->ne[0] * sizeof(float));
    bool ok = f != NULL;
    for (int32_t i = 0; ok && i < n_ids; ++i) {
        float * dst = rows + (size_t) i * t->ne[0];
        ok = pi_fseek(f, start + (pi_off_t) ids[i] * (pi_off_t) row_size, SEEK_SET) == 0 && fread(raw, 1, row_size, f) == row_size;
        if (ok && t->type == GGML_TYPE_F32) {
            memcpy(dst, raw, row_size);
        } else if (ok) {
            traits->to_float(raw, dst, t->ne[0]);
        }
    }
    if (ok) {
        *width = t->ne[0];
    } else {
        snprintf(st->error, sizeof(st->error), "could not read %s from %s", name, part);
        free(rows);
        rows = NULL;
    }
done:
    free(raw);
    if (f != NULL) {
        fclose(f);
    }
    gguf_free(g);
    ggml_free(meta);
    return rows;
}
