/*
 * expert_map.h — who owns which expert: the placement of E experts over N ranks, each acting
 * as V virtual ranks (G = N*V in all).
 *
 * Rank level: either the caller's owner table (owner[e] = the real rank holding expert e; any
 * assignment, a rank may own none) or contiguous slices with the first E mod N ranks owning
 * one more (N > E is refused: a rank would own nothing by accident). Virtual level: each rank's
 * experts, in ascending id order, are cut into V contiguous parts, the first (El mod V) parts
 * one longer; virtual rank d = r*V + v owns part v of rank r.
 *
 * A process holds its El experts in ascending global id order ("local index" = position in
 * that list); virtual rank v's experts are local indices [vfirst[v], vfirst[v] + vcount[v]).
 * Dispatch sends, for each slot, the expert's index WITHIN its virtual rank (vlocal[e]), so a
 * receiver sorts its rows over [0, vcount) whatever ids it owns.
 */
#ifndef MOE_EXPERT_MAP_H
#define MOE_EXPERT_MAP_H

#include <stdbool.h>
#include <stdint.h>

#include "../common.h"

typedef struct moe_expert_map {
    int E, N, V, G;
    int rank;            /* this process's real rank */
    int32_t *owner;      /* [E] real rank */
    int32_t *vowner;     /* [E] virtual rank d = r*V + v */
    int32_t *vlocal;     /* [E] index among virtual rank vowner[e]'s experts */
    int32_t *vcount;     /* [G] experts of each virtual rank */
    int El;              /* experts of this process */
    int32_t *local_ids;  /* [El] ascending global ids (NULL when El = 0) */
    int32_t *vfirst;     /* [V] first local index of this process's virtual rank v */
    int32_t *rank_count; /* [N] experts of each real rank */
    bool explicit_map;   /* built from a caller's table (not the default slices) */
} moe_expert_map;

/* Build the map. owner: [E] real ranks, or NULL for the default slices. Errors name the
 * offending expert/rank: an owner outside [0, N), N > E with the default slices, E, N or V
 * out of range. On failure *m is zeroed. */
moe_status moe_expert_map_build(int num_experts, int nranks, int virtual_ranks, int rank,
                                const int32_t *owner, moe_expert_map *m, moe_error *err);
void moe_expert_map_free(moe_expert_map *m);

/* Whether this process's experts are one contiguous id range (then *begin = its first). */
bool moe_expert_map_contiguous(const moe_expert_map *m, int *begin);
/* FNV-1a over (E, N, V, owner[]): equal on every rank exactly when the maps are equal. */
uint64_t moe_expert_map_hash(const moe_expert_map *m);

/* Parse a placement file: JSON {"experts_per_rank": [[ids...], ...]} with exactly N lists (one
 * per real rank) that together name every expert of [0, E) exactly once; ids need not be
 * contiguous or sorted and a list may be empty. A repeated id (replication) is refused: each
 * expert has exactly one owner for now. *owner is malloc'ed [E] (free()). */
moe_status moe_expert_map_load_file(const char *path, int num_experts, int nranks,
                                    int32_t **owner, moe_error *err);
/* The same from JSON text (what the file holds); `what` names it in messages. */
moe_status moe_expert_map_parse(const char *json, const char *what, int num_experts,
                                int nranks, int32_t **owner, moe_error *err);

#endif /* MOE_EXPERT_MAP_H */
