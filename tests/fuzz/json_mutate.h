/* Structure-aware mutation of a JSON document, shared by the harnesses (header-only: each
 * harness is one translation unit).
 *
 * Byte mutations rarely keep a JSON document valid while changing one number to a value
 * that matters, so each harness's LLVMFuzzerCustomMutator parses its input with jansson and
 * calls fuzz_json_mutate, which makes one change: an integer set to a boundary value (or
 * nudged, or shifted left), a string set to another string of the document, to one of the
 * harness's words or to a fresh name, or an array element duplicated or removed. */
#ifndef VDIST_FUZZ_JSON_MUTATE_H
#define VDIST_FUZZ_JSON_MUTATE_H

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t fuzz_rng(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

enum { FUZZ_MAX_NODES = 4096 };

/* The document's value nodes by kind, depth-first (borrowed pointers). */
struct fuzz_nodes {
    json_t *ints[FUZZ_MAX_NODES], *strs[FUZZ_MAX_NODES], *arrays[FUZZ_MAX_NODES];
    size_t nint, nstr, narray;
};

static void fuzz_gather(json_t *v, struct fuzz_nodes *n)
{
    if (json_is_integer(v) && n->nint < FUZZ_MAX_NODES) n->ints[n->nint++] = v;
    if (json_is_string(v) && n->nstr < FUZZ_MAX_NODES) n->strs[n->nstr++] = v;
    if (json_is_array(v)) {
        if (n->narray < FUZZ_MAX_NODES) n->arrays[n->narray++] = v;
        for (size_t i = 0; i < json_array_size(v); i++) fuzz_gather(json_array_get(v, i), n);
    }
    if (json_is_object(v)) {
        const char *key;
        json_t *child;
        json_object_foreach(v, key, child) fuzz_gather(child, n);
    }
}

/* A value near a limit a parser must guard: small sizes, 2^24, int, 2^32, 2^40, offsets
 * that wrap size_t when added or multiplied. */
static json_int_t fuzz_boundary(uint64_t r, json_int_t old)
{
    static const json_int_t fixed[] = {
        0, 1, -1, 2, 3, 16, 1 << 20, 1 << 24, (1 << 24) + 1, 1LL << 30, 0x7fffffff, 1LL << 31,
        0xffffffffLL, 1LL << 32, 1LL << 40, (1LL << 40) + 1, 1LL << 62, 0x4000000000000000LL - 1,
        0x7ffffffffffffff0LL, 0x7fffffffffffffffLL, -0x7fffffffffffffffLL - 1,
    };
    switch (r % 4) {
    case 0: return (json_int_t)((uint64_t)old + (r >> 8) % 5 - 2); /* wraps, on purpose */
    case 1: return (json_int_t)((uint64_t)old << ((r >> 8) % 41));
    default: return fixed[(r >> 8) % (sizeof fixed / sizeof fixed[0])];
    }
}

/* One change to root; words (may be 0) are strings worth trying for the format at hand. */
static void fuzz_json_mutate(json_t *root, uint64_t *state, const char *const *words,
                             size_t nwords)
{
    struct fuzz_nodes *const n = calloc(1, sizeof *n);
    if (!n) abort();
    fuzz_gather(root, n);
    uint64_t const r = fuzz_rng(state);
    switch (r % 8) {
    case 0: case 1: case 2: case 3: /* an integer */
        if (n->nint) {
            json_t *const v = n->ints[fuzz_rng(state) % n->nint];
            json_integer_set(v, fuzz_boundary(fuzz_rng(state), json_integer_value(v)));
        }
        break;
    case 4: /* a string: another of the document's, or a word */
        if (n->nstr) {
            json_t *const v = n->strs[fuzz_rng(state) % n->nstr];
            if (nwords && (r & 256)) json_string_set(v, words[fuzz_rng(state) % nwords]);
            else json_string_set(v, json_string_value(n->strs[fuzz_rng(state) % n->nstr]));
        }
        break;
    case 5: case 6: /* an array element duplicated, or removed */
        if (n->narray) {
            json_t *const a = n->arrays[fuzz_rng(state) % n->narray];
            size_t const len = json_array_size(a);
            if (len == 0) break;
            size_t const i = fuzz_rng(state) % len;
            if (r % 8 == 5) json_array_append_new(a, json_deep_copy(json_array_get(a, i)));
            else json_array_remove(a, i);
        }
        break;
    default: /* a string renamed: a fresh name nothing else refers to */
        if (n->nstr) {
            json_t *const v = n->strs[fuzz_rng(state) % n->nstr];
            char name[256];
            snprintf(name, sizeof name, "%s_", json_string_value(v));
            json_string_set(v, name);
        }
        break;
    }
    free(n);
}

#endif
