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

/* ------------------------------------------------------------------------
 * TLB model (see emu/tlb/ for the semantics and the pure-Python twin).
 *
 * Structures are generic set-associative caches (ChampSim style): a tag is
 * the virtual address shifted by the structure's page shift; LRU uses a
 * per-entry age stamp, "random" a per-structure xorshift64 (deterministic).
 * ------------------------------------------------------------------------ */
#include <string.h>
#include <stdlib.h>

#define TLB_MAX_STRUCTS 16
#define REPL_LRU 0
#define REPL_RANDOM 1

struct tlb_struct {
    uint32_t sets, ways, shift, repl;   /* shift: 12, 21, 30 (TLB) or 21/30/39 (PSC) */
    uint32_t sizes;                     /* bitmask of levels: 1=4K 2=2M 4=1G 8=PML4E 16=PML5E */
    uint32_t pad;
    uint64_t rng;
    uint64_t *tag;                      /* sets*ways; 0 = invalid, else (vpn << 4) | (level << 1) | 1 */
    uint64_t *stamp;                    /* LRU stamps */
    uint8_t *level;                     /* page level of the entry (1..3) */
    uint8_t *global;
};

/* Counters, indexed as emu/tlb/counters.py COUNTERS lists them. */
enum {
    C_LOADS, C_STORES, C_FETCHES,
    C_L1_MISS_LOAD, C_L1_MISS_STORE, C_L1_MISS_FETCH,
    C_STLB_HIT_LOAD, C_STLB_HIT_STORE, C_STLB_HIT_FETCH,
    C_WALK_LOAD, C_WALK_STORE, C_WALK_FETCH,
    C_WALK_4K_LOAD, C_WALK_2M_LOAD, C_WALK_1G_LOAD,
    C_WALK_4K_STORE, C_WALK_2M_STORE, C_WALK_1G_STORE,
    C_WALK_4K_FETCH, C_WALK_2M_FETCH, C_WALK_1G_FETCH,
    C_WALK_REFS, C_WALK_FAULTS, C_PSC_HIT_PML4, C_PSC_HIT_PDPT, C_PSC_HIT_PDE,
    C_UNDECODED, C_PSC_HIT_PML5, C_NCOUNTERS
};

struct tlb_model {
    struct tlb_struct s[TLB_MAX_STRUCTS];
    int32_t l1d[3], l1i[3];             /* index per level (1..3 -> [0..2]), -1 none */
    int32_t stlb[3];                    /* second level per level, -1 none */
    int32_t psc[4];                     /* PML4E, PDPTE, PDE, PML5E caches, -1 none */
    uint64_t clock;
    uint64_t counters[C_NCOUNTERS];
    /* walking */
    const uint64_t *ram64;
    uint64_t ram_qwords;
    uint64_t cr3;
    uint64_t ram_first;                 /* qword index of ram64[0]: RAM's physical base / 8 */
    uint64_t levels;                    /* paging levels: 4, or 5 (CR4.LA57); 0 reads as 4 */
};

static inline uint64_t xs64(uint64_t *s) { uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; *s = x; return x; }

void dmfrag_tlb_init_struct(struct tlb_model *m, int idx, uint32_t sets, uint32_t ways,
                            uint32_t shift, uint32_t repl, uint32_t sizes, uint64_t *tag,
                            uint64_t *stamp, uint8_t *level, uint8_t *global)
{
    struct tlb_struct *t = &m->s[idx];
    t->sets = sets; t->ways = ways; t->shift = shift; t->repl = repl; t->sizes = sizes;
    t->rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)(idx + 1);
    t->tag = tag; t->stamp = stamp; t->level = level; t->global = global;
}

static int st_lookup(struct tlb_model *m, int idx, uint64_t va, uint8_t *level_out)
{
    if (idx < 0) return 0;
    struct tlb_struct *t = &m->s[idx];
    /* An entry of level L is tagged by va >> shift(L); a structure holding
     * several sizes (shared STLB, Zen's L1) is probed once per size. */
    for (int lv = 1; lv <= 5; lv++) {
        if (!(t->sizes & (1u << (lv - 1)))) continue;
        uint32_t shift = 12 + 9 * (lv - 1);
        uint64_t vpn = va >> shift;
        uint64_t want = (vpn << 4) | ((uint64_t)lv << 1) | 1;
        uint64_t set = vpn % t->sets;
        uint64_t *tags = t->tag + set * t->ways;
        for (uint32_t w = 0; w < t->ways; w++) {
            if (tags[w] == want) {
                t->stamp[set * t->ways + w] = ++m->clock;
                if (level_out) *level_out = (uint8_t)lv;
                return 1;
            }
        }
    }
    return 0;
}

static void st_fill(struct tlb_model *m, int idx, uint64_t va, int lv, int global)
{
    if (idx < 0) return;
    struct tlb_struct *t = &m->s[idx];
    uint32_t shift = 12 + 9 * (lv - 1);
    uint64_t vpn = va >> shift;
    uint64_t want = (vpn << 4) | ((uint64_t)lv << 1) | 1;
    uint64_t set = vpn % t->sets;
    uint64_t base = set * t->ways;
    uint32_t victim = 0;
    for (uint32_t w = 0; w < t->ways; w++) {
        if (t->tag[base + w] == want) { victim = w; goto put; }
    }
    for (uint32_t w = 0; w < t->ways; w++) {
        if (!t->tag[base + w]) { victim = w; goto put; }
    }
    if (t->repl == REPL_RANDOM) {
        victim = (uint32_t)(xs64(&t->rng) % t->ways);
    } else {
        uint64_t oldest = ~0ull;
        for (uint32_t w = 0; w < t->ways; w++)
            if (t->stamp[base + w] < oldest) { oldest = t->stamp[base + w]; victim = w; }
    }
put:
    t->tag[base + victim] = want;
    t->stamp[base + victim] = ++m->clock;
    t->level[base + victim] = (uint8_t)lv;
    t->global[base + victim] = (uint8_t)global;
}

/* Walk the tables in guest RAM (the same rules as emu/pagetable.walk for a
 * present, non-faulting walk). Returns the leaf level (1..3), 0 on a fault.
 * *refs counts the entries read after the deepest paging-structure-cache hit. */
static int tlb_walk(struct tlb_model *m, uint64_t va, int *global, uint32_t *refs)
{
    const uint64_t addr_mask = ((1ull << 52) - 1) & ~0xFFFull;
    uint64_t table = m->cr3 & addr_mask;
    int top = m->levels == 5 ? 5 : 4;
    int start = top;
    /* Deepest paging-structure cache hit: PDE (skip to PT), PDPTE, PML4E. */
    uint8_t dummy;
    int hit_pde = st_lookup(m, m->psc[2], va, &dummy);
    int hit_pdpte = !hit_pde && st_lookup(m, m->psc[1], va, &dummy);
    int hit_pml4e = !hit_pde && !hit_pdpte && st_lookup(m, m->psc[0], va, &dummy);
    /* 5-level: the PML5E cache (tag va>>48) saves the PML5E read */
    int hit_pml5e = top == 5 && !hit_pde && !hit_pdpte && !hit_pml4e
                    && st_lookup(m, m->psc[3], va, &dummy);
    if (hit_pde) { m->counters[C_PSC_HIT_PDE]++; start = 1; }
    else if (hit_pdpte) { m->counters[C_PSC_HIT_PDPT]++; start = 2; }
    else if (hit_pml4e) { m->counters[C_PSC_HIT_PML4]++; start = 3; }
    else if (hit_pml5e) { m->counters[C_PSC_HIT_PML5]++; start = 4; }
    /* The cached entries' contents are re-read from RAM here (the model
     * keeps tags only); only the reference count depends on the hit. */
    uint32_t n = 0;
    for (int level = top; level >= 1; level--) {
        uint64_t idx = (va >> (12 + 9 * (level - 1))) & 511;
        uint64_t slot = (table >> 3) + idx;
        if (slot < m->ram_first || slot - m->ram_first >= m->ram_qwords) return 0;
        uint64_t e = m->ram64[slot - m->ram_first];
        if (level <= start) n++;
        if (!(e & 1)) return 0;
        int leaf = level == 1 || (level <= 3 && (e & 0x80));
        if (leaf) {
            *global = (e >> 8) & 1;
            *refs = n;
            /* fill paging-structure caches for the non-leaf levels used */
            /* Cache the non-leaf entries the walk went through: the PML4E
             * (tag va>>39, "level 4"), the PDPTE if it pointed to a PD
             * (va>>30), the PDE if it pointed to a PT (va>>21). */
            if (top == 5) st_fill(m, m->psc[3], va, 5, 0);
            st_fill(m, m->psc[0], va, 4, 0);
            if (level <= 2) st_fill(m, m->psc[1], va, 3, 0);
            if (level <= 1) st_fill(m, m->psc[2], va, 2, 0);
            return level;
        }
        table = e & addr_mask;
    }
    return 0;
}

/* One access: 0 load, 1 store, 2 fetch. */
void dmfrag_tlb_access(struct tlb_model *m, uint64_t va, int kind)
{
    int32_t *l1 = kind == 2 ? m->l1i : m->l1d;
    m->counters[C_LOADS + kind]++;
    uint8_t lv;
    for (int i = 0; i < 3; i++) {
        if (l1[i] >= 0 && (i == 0 || l1[i] != l1[i - 1]) && st_lookup(m, l1[i], va, &lv))
            return;
    }
    m->counters[C_L1_MISS_LOAD + kind]++;
    for (int i = 0; i < 3; i++) {
        if (m->stlb[i] >= 0 && (i == 0 || m->stlb[i] != m->stlb[i - 1])
                && st_lookup(m, m->stlb[i], va, &lv)) {
            m->counters[C_STLB_HIT_LOAD + kind]++;
            st_fill(m, l1[lv - 1], va, lv, 0);
            return;
        }
    }
    m->counters[C_WALK_LOAD + kind]++;
    int global = 0;
    uint32_t refs = 0;
    int level = tlb_walk(m, va, &global, &refs);
    m->counters[C_WALK_REFS] += refs;
    if (!level) { m->counters[C_WALK_FAULTS]++; return; }
    m->counters[C_WALK_4K_LOAD + 3 * kind + (level - 1)]++;
    st_fill(m, m->stlb[level - 1], va, level, global);
    st_fill(m, l1[level - 1], va, level, global);
}

/* Accesses in order (an access replay's stream, fed after the CPU ran it:
 * the same sequence the hooks would have seen, without a hook per access). */
void dmfrag_tlb_access_many(struct tlb_model *m, const uint64_t *va, const uint8_t *kind,
                            uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        dmfrag_tlb_access(m, va[i], kind[i]);
}

/* INVLPG: drop every TLB entry covering va; all paging-structure caches. */
void dmfrag_tlb_invlpg(struct tlb_model *m, uint64_t va, int nstructs, int first_psc)
{
    for (int i = 0; i < nstructs; i++) {
        struct tlb_struct *t = &m->s[i];
        if (i >= first_psc) {
            memset(t->tag, 0, sizeof(uint64_t) * t->sets * t->ways);
            continue;
        }
        for (int lv = 1; lv <= 4; lv++) {
            if (!(t->sizes & (1u << (lv - 1)))) continue;
            uint64_t vpn = va >> (12 + 9 * (lv - 1));
            uint64_t want = (vpn << 4) | ((uint64_t)lv << 1) | 1;
            uint64_t set = vpn % t->sets;
            for (uint32_t w = 0; w < t->ways; w++)
                if (t->tag[set * t->ways + w] == want) t->tag[set * t->ways + w] = 0;
        }
    }
}

/* CR3 load (keep_global) or full flush. */
void dmfrag_tlb_flush(struct tlb_model *m, int nstructs, int keep_global)
{
    for (int i = 0; i < nstructs; i++) {
        struct tlb_struct *t = &m->s[i];
        uint64_t n = (uint64_t)t->sets * t->ways;
        for (uint64_t j = 0; j < n; j++)
            if (!keep_global || !t->global[j]) t->tag[j] = 0;
    }
}

/* ---- VA recovery for the memory hook --------------------------------- */

typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*decode_cb)(uint64_t rip);

struct memop_desc {
    uint64_t rip;            /* 0 = empty slot */
    int32_t rd_base, rd_index, wr_base, wr_index;  /* unicorn reg ids, 0 = none */
    int64_t rd_disp, wr_disp;
    int32_t rd_scale, wr_scale;
    int32_t rd_kind, wr_kind;  /* 0 none, 1 operand, 2 stack pop (rsp), 3 stack push (rsp-size), 4 rip-relative */
};

struct tlb_hook_ctx {
    struct tlb_model *model;
    void *uc;
    uc_reg_read_fn reg_read;
    decode_cb decode;
    int32_t rip_id, rsp_id, cr3_id;
    /* Nonzero: every data access is [this register] (an access replay's
     * straight-line code, TlbModel.fixed_operand): no RIP is read, which in
     * the middle of a long translated block costs Unicorn a state restore. */
    int32_t fixed_base_id;
    struct memop_desc *table;   /* open addressing, power-of-two size */
    uint64_t table_mask;
};

static struct memop_desc *desc_find(struct tlb_hook_ctx *c, uint64_t rip, int create)
{
    uint64_t h = (rip * 0x9E3779B97F4A7C15ull) & c->table_mask;
    for (uint64_t i = 0; i <= c->table_mask; i++) {
        struct memop_desc *d = &c->table[(h + i) & c->table_mask];
        if (d->rip == rip) return d;
        if (d->rip == 0) {
            if (!create) return NULL;
            d->rip = rip;
            return d;
        }
    }
    return NULL;
}

void dmfrag_desc_set(struct tlb_hook_ctx *c, uint64_t rip, int32_t rd_kind, int32_t rd_base,
                     int32_t rd_index, int32_t rd_scale, int64_t rd_disp, int32_t wr_kind,
                     int32_t wr_base, int32_t wr_index, int32_t wr_scale, int64_t wr_disp)
{
    struct memop_desc *d = desc_find(c, rip, 1);
    if (!d) return;
    d->rd_kind = rd_kind; d->rd_base = rd_base; d->rd_index = rd_index;
    d->rd_scale = rd_scale; d->rd_disp = rd_disp;
    d->wr_kind = wr_kind; d->wr_base = wr_base; d->wr_index = wr_index;
    d->wr_scale = wr_scale; d->wr_disp = wr_disp;
}

static uint64_t reg(struct tlb_hook_ctx *c, int id)
{
    uint64_t v = 0;
    if (id) c->reg_read(c->uc, id, &v);
    return v;
}

/* UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE: `address` is physical. */
void dmfrag_tlb_mem_hook(void *uc, int type, uint64_t address, int size, int64_t value,
                         void *user_data)
{
    struct tlb_hook_ctx *c = (struct tlb_hook_ctx *)user_data;
    (void)value; (void)uc;
    int is_write = type == 17;          /* UC_MEM_WRITE = 17, UC_MEM_READ = 16 */
    if (c->fixed_base_id) {
        uint64_t fva = reg(c, c->fixed_base_id);
        if ((address & 0xFFF) == 0 && (fva & 0xFFF) != 0)
            return;                     /* the second part of a page-crossing access */
        dmfrag_tlb_access(c->model, fva, is_write ? 1 : 0);
        if ((fva & 0xFFF) + (uint64_t)size > 4096)     /* both pages are translated */
            dmfrag_tlb_access(c->model, (fva | 0xFFF) + 1, is_write ? 1 : 0);
        return;
    }
    uint64_t rip = reg(c, c->rip_id);
    struct memop_desc *d = desc_find(c, rip, 0);
    if (!d) {
        c->decode(rip);
        d = desc_find(c, rip, 0);
        if (!d) { c->model->counters[C_UNDECODED]++; return; }
    }
    int kind = is_write ? d->wr_kind : d->rd_kind;
    uint64_t va;
    switch (kind) {
    case 1: {
        int32_t b = is_write ? d->wr_base : d->rd_base;
        int32_t ix = is_write ? d->wr_index : d->rd_index;
        int32_t sc = is_write ? d->wr_scale : d->rd_scale;
        int64_t disp = is_write ? d->wr_disp : d->rd_disp;
        va = reg(c, b) + reg(c, ix) * (uint64_t)sc + (uint64_t)disp;
        break;
    }
    case 4:
        va = (uint64_t)(is_write ? d->wr_disp : d->rd_disp);   /* absolute, resolved at decode */
        break;
    case 2: va = reg(c, c->rsp_id); break;
    case 3: va = reg(c, c->rsp_id) - (uint64_t)size; break;
    default:
        c->model->counters[C_UNDECODED]++;
        return;
    }
    /* A page-crossing access needs two translations. Unicorn 2.1.4 reports
     * it once, with the start; builds that report it twice (unicorn #1876)
     * give the second part at a page-aligned physical address while the
     * operand is not page-aligned: that part was counted with the first. */
    if ((address & 0xFFF) == 0 && (va & 0xFFF) != 0)
        return;
    /* CR3 is refreshed by the block hook, which runs before every block. */
    dmfrag_tlb_access(c->model, va, is_write ? 1 : 0);
    if ((va & 0xFFF) + (uint64_t)size > 4096)
        dmfrag_tlb_access(c->model, (va | 0xFFF) + 1, is_write ? 1 : 0);
}

/* UC_HOOK_BLOCK: instruction fetch, one ITLB access per page of the block. */
void dmfrag_tlb_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct tlb_hook_ctx *c = (struct tlb_hook_ctx *)user_data;
    (void)uc;
    c->model->cr3 = reg(c, c->cr3_id);
    uint64_t end = address + (size ? size : 1) - 1;
    for (uint64_t p = address & ~0xFFFull; p <= end; p += 4096)
        dmfrag_tlb_access(c->model, p < address ? address : p, 2);
}
