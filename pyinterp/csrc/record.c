// pyinterp native layer: the record, a recipe that keeps the name and shape of every tensor offered to the
// hook, as llama.cpp made it (pi_set_record).

#include "internal.h"

struct pi_seen {
    char    name[PI_NAME_MAX + 8]; // "l_out-3"
    int64_t ne[4];
};

struct pi_record {
    bool on;
    struct pi_seen * seen;          // every (name, il) offered to the hook during the last build
    int32_t n_seen;
    int32_t cap_seen;
};

extern const struct pi_recipe pi_recipe_record;

void pi_set_record(struct pi_state * st, bool record) {
    struct pi_record * self = pi_self(st, &pi_recipe_record);
    self->on     = record;
    self->n_seen = 0;
    pi_update_hook(st);
    pi_drop_graph(st);
}

int32_t pi_n_seen(const struct pi_state * st) {
    const struct pi_record * self = pi_self(st, &pi_recipe_record);
    return self->n_seen;
}

const char * pi_seen_name(const struct pi_state * st, int32_t i, int64_t * ne) {
    const struct pi_record * self = pi_self(st, &pi_recipe_record);
    for (int d = 0; d < 4; ++d) {
        ne[d] = self->seen[i].ne[d];
    }
    return self->seen[i].name;
}

static void pi_record_clear(struct pi_state * st, void * data) {
    struct pi_record * self = data;
    self->on = false;               // what the last build saw stays readable
}

static void pi_record_release(struct pi_state * st, void * data) {
    struct pi_record * self = data;
    free(self->seen);
}

static bool pi_record_active(const struct pi_state * st, const void * data) {
    const struct pi_record * self = data;
    return self->on;
}

static void pi_record_begin(struct pi_state * st, void * data) {
    struct pi_record * self = data;
    self->n_seen = 0;
}

static struct ggml_tensor * pi_record_tensor(struct pi_state * st, void * data, struct ggml_context * ctx,
                                             struct ggml_cgraph * gf, struct ggml_tensor * cur, const char * name,
                                             int32_t il) {
    struct pi_record * self = data;
    if (!self->on) {
        return cur;
    }
    if (self->n_seen == self->cap_seen) {
        self->cap_seen = self->cap_seen ? 2*self->cap_seen : 256;
        self->seen = realloc(self->seen, self->cap_seen * sizeof(*self->seen));
    }
    struct pi_seen * seen = &self->seen[self->n_seen++];
    if (il >= 0) {
        snprintf(seen->name, sizeof(seen->name), "%s-%d", name, il);
    } else {
        snprintf(seen->name, sizeof(seen->name), "%s", name);
    }
    for (int d = 0; d < 4; ++d) {
        seen->ne[d] = cur->ne[d];
    }
    return cur;
}

const struct pi_recipe pi_recipe_record = {
    .name    = "record",
    .size    = sizeof(struct pi_record),
    .clear   = pi_record_clear,
    .release = pi_record_release,
    .active  = pi_record_active,
    .begin   = pi_record_begin,
    .tensor  = pi_record_tensor,
};
