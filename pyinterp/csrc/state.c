// pyinterp native layer: loading a model, making a context, and the state the hook works from.

#include "internal.h"

int pi_fail(struct pi_state * st, const char * msg) {
    snprintf(st->error, sizeof(st->error), "%s", msg);
    return -1;
}

const char * pi_last_error(const struct pi_state * st) {
    return st->error;
}

ggml_backend_buffer_type_t pi_layer_buft(const struct pi_state * st, int32_t il) {
    return ggml_backend_dev_buffer_type(llama_model_layer_dev(st->model, il));
}

// the RPC backend is a module loaded at run time (GGML_BACKEND_DL): its functions come from its registry
typedef ggml_backend_reg_t (*pi_rpc_add_server_t)(const char * endpoint);
typedef void (*pi_rpc_start_server_t)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                      size_t n_devices, ggml_backend_dev_t * devices);

static void * pi_rpc_proc(const char * name) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    return reg != NULL ? ggml_backend_reg_get_proc_address(reg, name) : NULL;
}

// rpc_endpoint (host:port of a ggml RPC server, or NULL): offload to that server's first device only
struct llama_model * pi_model_load(const char * path, int32_t n_gpu_layers, const char * rpc_endpoint) {
    struct llama_model_params params = llama_model_default_params();
    params.n_gpu_layers = n_gpu_layers;
    ggml_backend_dev_t devices[2] = { NULL, NULL };
    if (rpc_endpoint != NULL) {
        pi_rpc_add_server_t add_server = (pi_rpc_add_server_t) pi_rpc_proc("ggml_backend_rpc_add_server");
        ggml_backend_reg_t reg = add_server != NULL ? add_server(rpc_endpoint) : NULL;
        if (reg == NULL || ggml_backend_reg_dev_count(reg) == 0) {
            return NULL;
        }
        devices[0] = ggml_backend_reg_dev_get(reg, 0);
        params.devices = devices;
    }
    return llama_model_load_from_file(path, params);
}

bool pi_has_rpc(void) {
    return pi_rpc_proc("ggml_backend_rpc_add_server") != NULL;
}

// serve this process's CPU to ggml RPC clients at endpoint (host:port); returns only on failure
void pi_rpc_serve(const char * endpoint, int32_t n_threads) {
    pi_rpc_start_server_t start_server = (pi_rpc_start_server_t) pi_rpc_proc("ggml_backend_rpc_start_server");
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (start_server != NULL && cpu != NULL) {
        start_server(endpoint, NULL, (size_t) n_threads, 1, &cpu);
    }
}

// whether any layer (or the output) is on a device other than the CPU; a model kept on the CPU stays there:
// llama.cpp would otherwise still send a large batch's products to a GPU backend (op_offload), so a CPU run of a
// CUDA or Metal build would neither run on the CPU nor put the model on the GPU
static bool pi_model_offloaded(const struct llama_model * model) {
    for (int32_t il = -1; il < llama_model_n_layer(model); ++il) {
        if (ggml_backend_dev_type(llama_model_layer_dev(model, il)) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            return true;
        }
    }
    return false;
}

// flash_attn: -1 auto, 0 off (the explicit path on every layer), 1 on; type_k/type_v: enum ggml_type of the KV
// cache; n_seq_max: sequences one decode may hold (they share one KV cache of n_ctx cells)
struct llama_context * pi_context_new(struct llama_model * model, uint32_t n_ctx, int32_t n_threads, int32_t flash_attn,
                                      int32_t type_k, int32_t type_v, int32_t n_seq_max) {
    struct llama_context_params params = llama_context_default_params();
    params.n_ctx           = n_ctx;
    params.n_batch         = n_ctx;   // one decode is one ubatch: op rows index it directly
    params.n_ubatch        = n_ctx;
    params.n_seq_max       = n_seq_max;
    params.kv_unified      = true;    // sequences share cells: a copied prefix is stored once
    params.n_threads       = n_threads;
    params.n_threads_batch = n_threads;
    params.swa_full        = true;    // KV cell i holds position i in every layer
    params.no_perf         = true;
    params.flash_attn_type = flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO :
                             flash_attn > 0 ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    params.type_k          = (enum ggml_type) type_k;
    params.type_v          = (enum ggml_type) type_v;
    params.op_offload      = pi_model_offloaded(model);
    return llama_init_from_model(model, params);
}

struct pi_state * pi_state_new(struct llama_context * ctx) {
    struct pi_state * st = calloc(1, sizeof(struct pi_state));
    st->ctx     = ctx;
    st->model   = llama_get_model(ctx);
    st->n_layer = llama_model_n_layer(st->model);
    st->n_head  = llama_model_n_head(st->model);
    struct ggml_init_params meta_params = { PI_META_TENSORS * ggml_tensor_overhead(), NULL, true };
    st->meta = ggml_init(meta_params);
    st->self = calloc(pi_n_recipes, sizeof(void *));
    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        const struct pi_recipe * recipe = pi_recipes[i];
        st->self[i] = calloc(1, recipe->size);
        if (recipe->init != NULL && !recipe->init(st, st->self[i])) {
            pi_state_free(st);
            return NULL;
        }
    }
    return st;
}

void pi_state_free(struct pi_state * st) {
    if (st == NULL) {
        return;
    }
    if (st->hook_set) {
        llama_set_graph_hook(st->ctx, NULL, NULL);
    }
    for (int32_t i = 0; i < pi_n_recipes && st->self[i] != NULL; ++i) {
        const struct pi_recipe * recipe = pi_recipes[i];
        recipe->clear(st, st->self[i]);
        if (recipe->release != NULL) {
            recipe->release(st, st->self[i]);
        }
        free(st->self[i]);
    }
    free(st->self);
    if (st->meta) {
        ggml_free(st->meta);
    }
    free(st->kept);
    free(st);
}

// the hook is set on the context only while a recipe has something to do, so a run without interventions
// or readouts is stock llama.cpp
void pi_update_hook(struct pi_state * st) {
    bool want = false;
    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        want = want || pi_recipes[i]->active(st, st->self[i]);
    }
    if (want != st->hook_set) {
        llama_set_graph_hook(st->ctx, want ? pi_hook : NULL, want ? st : NULL);
        st->hook_set = want;
    }
}

void pi_drop_graph(struct pi_state * st) {
    if (st->hook_set) {
        llama_set_graph_hook(st->ctx, pi_hook, st);
    }
}

void pi_plan_clear(struct pi_state * st) {
    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        pi_recipes[i]->clear(st, st->self[i]);
    }
    st->gf = NULL; // removing the hook drops the graph
    pi_drop_graph(st);
    pi_update_hook(st);
}
