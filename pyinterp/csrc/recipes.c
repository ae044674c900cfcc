// pyinterp native layer: the recipe table. The hook applies the recipes in this order to every tensor: the
// record sees the tensors as llama.cpp made them, the frozen norms and attention replace theirs (so captures see
// the frozen ones), the ops, SAEs and transcoders change them, the lens and the attribution read them as the
// interventions left them.

#include "internal.h"

extern const struct pi_recipe pi_recipe_record;
extern const struct pi_recipe pi_recipe_freeze;
extern const struct pi_recipe pi_recipe_ops;
extern const struct pi_recipe pi_recipe_sae;
extern const struct pi_recipe pi_recipe_transcoder;
extern const struct pi_recipe pi_recipe_lens;
extern const struct pi_recipe pi_recipe_attribution;

const struct pi_recipe * const pi_recipes[] = {
    &pi_recipe_record,
    &pi_recipe_freeze,
    &pi_recipe_ops,
    &pi_recipe_sae,
    &pi_recipe_transcoder,
    &pi_recipe_lens,
    &pi_recipe_attribution,
};

const int32_t pi_n_recipes = sizeof(pi_recipes) / sizeof(pi_recipes[0]);

void * pi_self(const struct pi_state * st, const struct pi_recipe * recipe) {
    for (int32_t i = 0; i < pi_n_recipes; ++i) {
        if (pi_recipes[i] == recipe) {
            return st->self[i];
        }
    }
    return NULL;
}
