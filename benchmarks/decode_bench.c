// Times llama_decode of one prompt with the stock llama.h API only, so the same source builds
// against pyinterp's patched libllama and against an unpatched one.
//
//   decode_bench MODEL N_TOKENS N_RUNS N_THREADS BACKEND_DIR   -> one line per run: milliseconds
//
// Both builds load their ggml backends (the best CPU variant) from BACKEND_DIR, as llama.cpp's tools do.

#include "llama.h"

#include <stdio.h>
#include <stdlib.h>

static void quiet(enum ggml_log_level level, const char * text, void * user_data) {
    (void) level; (void) text; (void) user_data;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL N_TOKENS N_RUNS N_THREADS BACKEND_DIR\n", argv[0]);
        return 2;
    }
    const int n_tokens = atoi(argv[2]);
    const int n_runs   = atoi(argv[3]);
    const int n_thread = atoi(argv[4]);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    ggml_backend_load_all_from_path(argv[5]);

    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = 512;
    cparams.n_batch         = 512;
    cparams.n_ubatch        = 512;
    cparams.n_threads       = n_thread;
    cparams.n_threads_batch = n_thread;
    cparams.no_perf         = true;
    struct llama_context * ctx = llama_init_from_model(model, cparams);

    struct llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int i = 0; i < n_tokens; ++i) {
        batch.token[i]     = 100 + (i * 37) % 5000;
        batch.pos[i]       = i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = 1;
    }
    batch.n_tokens = n_tokens;

    for (int r = 0; r < n_runs; ++r) {
        llama_memory_clear(llama_get_memory(ctx), true);
        const int64_t t0 = llama_time_us();
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        llama_synchronize(ctx);
        printf("%.3f\n", (llama_time_us() - t0) / 1000.0);
        fflush(stdout);
    }

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
