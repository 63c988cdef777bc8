/*
 * config.h — the shape and semantics of one MoE block: presets and HF config.json parsing.
 */
#ifndef MOE_CONFIG_H
#define MOE_CONFIG_H

#include <stdbool.h>

#include "common.h"

typedef enum moe_arch {
    MOE_ARCH_QWEN3 = 0,  /* Qwen3MoeSparseMoeBlock: softmax -> top-k -> (renormalise) */
    MOE_ARCH_LLAMA4 = 1, /* Llama4TextMoe: top-k -> sigmoid, input scaled, shared expert */
} moe_arch;

typedef struct moe_config {
    moe_arch arch;
    char name[64];       /* preset name, or the config's model_type */
    int hidden;          /* H */
    int inter;           /* I: each routed expert's intermediate width */
    int num_experts;     /* E */
    int top_k;           /* k */
    bool norm_topk_prob; /* Qwen3 only: renormalise the k selected probabilities */
    int shared_inter;    /* width of the shared expert (Llama-4: intermediate_size); 0 = none */
    moe_dtype dtype;     /* the checkpoint's torch_dtype (default compute dtype) */
    int num_layers;      /* num_hidden_layers, 0 if not given */
} moe_config;

/* Names of the built-in presets, NULL-terminated. */
extern const char *const moe_preset_names[];

/* A preset by name: qwen3-30b-a3b, llama4-scout, tiny-qwen3, tiny-llama4. */
moe_status moe_config_preset(const char *name, moe_config *out, moe_error *err);
/* Parse an HF config.json (Qwen3MoeConfig as on the hub or re-saved by transformers 5;
 * Llama4TextConfig, or a full Llama4Config with the MoE fields under text_config). */
moe_status moe_config_from_json_file(const char *path, moe_config *out, moe_error *err);
moe_status moe_config_from_json_text(const char *text, moe_config *out, moe_error *err);
/* A preset name, or else a path to a config.json. */
moe_status moe_config_resolve(const char *preset_or_path, moe_config *out, moe_error *err);
/* Checks every field is in range (positive sizes, 1 <= k <= E, ...). */
moe_status moe_config_validate(const moe_config *c, moe_error *err);

#endif /* MOE_CONFIG_H */
