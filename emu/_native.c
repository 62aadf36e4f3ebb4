/*
 * Native callbacks for emu: hooks that run for every instruction or access
 * must not call into Python (an empty Python hook alone costs ~6x, DESIGN.md
 * section 7).  This file links against nothing: Unicorn entry points it needs
 * are handed over as function pointers by emu/_native.py, so it works with
 * whichever libunicorn the Python binding loaded.
 */
#include <stdint.h>
#include <stddef.h>

typedef int (*uc_emu_stop_fn)(void *uc);
typedef int (*uc_vmem_translate_fn)(void *uc, uint64_t va, int prot, uint64_t *pa);

/* Instruction counter and budget (UC_HOOK_CODE).  Counting every
 * instruction natively is what Unicorn's own `count` argument does, but it
 * hides the counter; this one is readable. */
struct insn_counter {
    uint64_t count;
    uint64_t limit;          /* stop once count reaches limit; 0 = no limit */
    uint64_t last_rip;       /* address of the last instruction started */
    int32_t hit_limit;
    int32_t pad;
    uc_emu_stop_fn stop;
};

void dmfrag_count_insn(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct insn_counter *c = (struct insn_counter *)user_data;
    (void)size;
    if (c->limit && c->count >= c->limit) {
        /* The hook runs before the instruction: stopping here means exactly
         * `limit` instructions ran. */
        c->hit_limit = 1;
        c->stop(uc);
        return;
    }
    c->last_rip = address;
    c->count++;
}

/* Batched uc_vmem_translate: the CPU's own walk for n addresses.
 * status[i] is Unicorn's uc_err (0 = translated). */
size_t dmfrag_translate_many(void *uc, uc_vmem_translate_fn translate,
                             const uint64_t *va, uint64_t *pa, uint8_t *status,
                             size_t n, int prot)
{
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t out = 0;
        int err = translate(uc, va[i], prot, &out);
        pa[i] = err ? 0 : out;
        status[i] = (uint8_t)err;
        ok += err == 0;
    }
    return ok;
}
