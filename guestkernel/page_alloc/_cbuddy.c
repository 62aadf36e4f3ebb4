/*
 * The buddy allocator's innermost loops in C: a CPython extension module
 * (guestkernel.page_alloc._cbuddy) that works on the allocator's own Python
 * state, so that the state after a call is exactly what the Python code of
 * buddy.py / pcp.py leaves (that Python code stays the reference; see
 * guestkernel/page_alloc/_native.py for how one or the other is chosen):
 *
 * - the per-pfn state byte (BuddyAllocator._state, a writable uint8 buffer)
 *   and the pageblock types (_pageblock_mt), read and written in place;
 * - the free lists: zone.free_area[order][migratetype], OrderedDicts
 *   {pfn: None} whose last entry is the kernel list's head, changed through
 *   their own methods (popitem, __setitem__, __delitem__, move_to_end);
 * - the per-CPU lists: deques, through their append method;
 * - the zone's counter zone.free_pages (NR_FREE_PAGES), an attribute.
 *
 * Each function mirrors a function of Linux's mm/page_alloc.c, named in its
 * comment, and the Python method of the same name in this package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_ORDER 11
#define PAGEBLOCK_ORDER 9
#define MIGRATE_PCPTYPES 3
#define PG_BUDDY 0x10

static PyObject *s_free_area, *s_free_pages, *s_start_pfn, *s_end_pfn, *s_popitem,
    *s_move_to_end, *s_append, *s_state, *s_pageblock_mt, *s_free_list_of;

/* A writable byte buffer (the allocator's _state / _pageblock_mt). */
static int get_bytes(PyObject *obj, Py_buffer *view, int writable)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (view->itemsize != 1) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "_cbuddy: expected a buffer of bytes");
        return -1;
    }
    return 0;
}

/* get_bytes of obj's attribute `name` (the allocator's _state or
 * _pageblock_mt); the buffer keeps the object alive, so no reference is
 * kept here. */
static int get_attr_bytes(PyObject *obj, PyObject *name, Py_buffer *view, int writable)
{
    PyObject *o = PyObject_GetAttr(obj, name);
    if (o == NULL)
        return -1;
    int rc = get_bytes(o, view, writable);
    Py_DECREF(o);
    return rc;
}

/* Bounds as a memoryview indexes (the Python code would raise there). */
static int check_index(Py_ssize_t i, Py_ssize_t len)
{
    if (i < 0 || i >= len) {
        PyErr_SetString(PyExc_IndexError, "index out of bounds on dimension 1");
        return -1;
    }
    return 0;
}

/* seq[i] for the free_area lists (a new reference). */
static PyObject *item(PyObject *seq, Py_ssize_t i)
{
    return PySequence_GetItem(seq, i);
}

/* free_area[order][mt] (a new reference). */
static PyObject *free_list(PyObject *fa, Py_ssize_t order, Py_ssize_t mt)
{
    PyObject *area = item(fa, order);
    if (area == NULL)
        return NULL;
    PyObject *d = item(area, mt);
    Py_DECREF(area);
    return d;
}

static int add_long_attr(PyObject *obj, PyObject *name, long delta)
{
    if (delta == 0)
        return 0;
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromLong(delta);
    if (d == NULL) {
        Py_DECREF(v);
        return -1;
    }
    PyObject *r = PyNumber_Add(v, d);
    Py_DECREF(v);
    Py_DECREF(d);
    if (r == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, r);
    Py_DECREF(r);
    return rc;
}

static int get_long_attr(PyObject *obj, PyObject *name, long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/*
 * __rmqueue_smallest (and expand) of one zone: the head of the smallest
 * non-empty free list of `mt` from `order` up, split down to `order` with
 * each upper half put at the head of its list. Returns the pfn, -1 when no
 * list has a block, -2 on a Python error. The caller accounts free_pages
 * (`1 << order` per block taken).
 */
static long rmqueue_smallest(unsigned char *st, Py_ssize_t stlen, PyObject *fa, int order,
                             Py_ssize_t mt)
{
    for (int current_order = order; current_order < MAX_ORDER; current_order++) {
        PyObject *d = free_list(fa, current_order, mt);
        if (d == NULL)
            return -2;
        Py_ssize_t n = PyDict_Check(d) ? PyDict_GET_SIZE(d) : PyObject_Size(d);
        if (n < 0) {
            Py_DECREF(d);
            return -2;
        }
        if (n == 0) {
            Py_DECREF(d);
            continue;
        }
        /* get_page_from_free_area + del_page_from_free_list */
        PyObject *kv = PyObject_CallMethodNoArgs(d, s_popitem);
        Py_DECREF(d);
        if (kv == NULL)
            return -2;
        long pfn = PyLong_AsLong(PyTuple_GET_ITEM(kv, 0));
        Py_DECREF(kv);
        if (pfn == -1 && PyErr_Occurred())
            return -2;
        if (check_index(pfn, stlen) < 0)
            return -2;
        st[pfn] = 0;
        /* expand: put each upper half at the head of the list of mt */
        long size = 1L << current_order;
        int high = current_order;
        while (high > order) {
            high--;
            size >>= 1;
            PyObject *h = free_list(fa, high, mt);
            if (h == NULL)
                return -2;
            PyObject *key = PyLong_FromLong(pfn + size);
            if (key == NULL) {
                Py_DECREF(h);
                return -2;
            }
            int rc = PyObject_SetItem(h, key, Py_None);
            Py_DECREF(key);
            Py_DECREF(h);
            if (rc < 0)
                return -2;
            if (check_index(pfn + size, stlen) < 0)
                return -2;
            st[pfn + size] = (unsigned char)(PG_BUDDY | high);
        }
        return pfn;
    }
    return -1;
}

/* rmqueue_smallest(allocator, zone, order, mt) -> pfn or -1: the buddy
 * core's __rmqueue_smallest (BuddyAllocator._rmqueue_smallest). */
static PyObject *py_rmqueue_smallest(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "rmqueue_smallest(allocator, zone, order, mt)");
        return NULL;
    }
    PyObject *alloc = args[0], *zone = args[1];
    long order = PyLong_AsLong(args[2]);
    Py_ssize_t mt = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer st;
    if (get_attr_bytes(alloc, s_state, &st, 1) < 0)
        return NULL;
    PyObject *fa = PyObject_GetAttr(zone, s_free_area);
    long pfn = -2;
    if (fa != NULL) {
        pfn = rmqueue_smallest(st.buf, st.len, fa, (int)order, mt);
        Py_DECREF(fa);
    }
    PyBuffer_Release(&st);
    if (pfn == -2)
        return NULL;
    if (pfn >= 0 && add_long_attr(zone, s_free_pages, -(1L << order)) < 0)
        return NULL;     /* __mod_zone_freepage_state */
    return PyLong_FromLong(pfn);
}

/*
 * rmqueue_bulk(allocator, zone, order, count, lst, mt, code) -> n: the
 * blocks rmqueue_bulk takes while __rmqueue_smallest finds one (up to
 * `count`), each marked `code` (PG_PCP | order) and appended to the pcp
 * list `lst` as pfn << 4 | mt (set_pcppage_migratetype), in the order
 * expand() produced them. Stops at the first block __rmqueue_smallest does
 * not find: the caller goes on with __rmqueue (fallback) in Python.
 */
static PyObject *py_rmqueue_bulk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "rmqueue_bulk(allocator, zone, order, count, lst, mt, code)");
        return NULL;
    }
    PyObject *alloc = args[0], *zone = args[1], *lst = args[4];
    long order = PyLong_AsLong(args[2]);
    long count = PyLong_AsLong(args[3]);
    Py_ssize_t mt = PyLong_AsSsize_t(args[5]);
    long code = PyLong_AsLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer st;
    if (get_attr_bytes(alloc, s_state, &st, 1) < 0)
        return NULL;
    PyObject *fa = PyObject_GetAttr(zone, s_free_area);
    PyObject *append = fa ? PyObject_GetAttr(lst, s_append) : NULL;
    long n = 0;
    int failed = (fa == NULL || append == NULL);
    unsigned char *buf = st.buf;
    while (!failed && n < count) {
        long pfn = rmqueue_smallest(buf, st.len, fa, (int)order, mt);
        if (pfn == -2) {
            failed = 1;
            break;
        }
        if (pfn < 0)
            break;
        n++;                /* taken from the free lists: accounted below */
        buf[pfn] = (unsigned char)code;
        PyObject *x = PyLong_FromLong(pfn << 4 | (long)mt);
        if (x == NULL) {
            failed = 1;
            break;
        }
        PyObject *r = PyObject_CallOneArg(append, x);
        Py_DECREF(x);
        if (r == NULL) {
            failed = 1;
            break;
        }
        Py_DECREF(r);
    }
    Py_XDECREF(append);
    Py_XDECREF(fa);
    PyBuffer_Release(&st);
    if (n) {
        /* __mod_zone_freepage_state of the blocks taken, even on an error */
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        if (add_long_attr(zone, s_free_pages, -(n << order)) < 0) {
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_value);
            Py_XDECREF(exc_tb);
            return NULL;
        }
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    if (failed)
        return NULL;
    return PyLong_FromLong(n);
}

/*
 * free_one_page(allocator, zone, pfn, order, mt, to_tail) -> None:
 * __free_one_page (BuddyAllocator._free_one_page): merge with the buddy
 * while it is free (__find_buddy_pfn), of the same order, in the zone and
 * (at pageblock order and above) not of an unmergeable, different type;
 * then add the block to the list of mt, at the tail with FPI_TO_TAIL or
 * when buddy_merge_likely. The buddy's list is found as _free_list_of does
 * (its pageblock's type first; any other case goes to that Python method,
 * which searches and raises BuddyInvariantError).
 */
static PyObject *py_free_one_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "free_one_page(allocator, zone, pfn, order, mt, to_tail)");
        return NULL;
    }
    PyObject *alloc = args[0], *zone = args[1];
    long pfn = PyLong_AsLong(args[2]);
    long order = PyLong_AsLong(args[3]);
    long mt = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    int fpi_to_tail = PyObject_IsTrue(args[5]);
    if (fpi_to_tail < 0)
        return NULL;
    long zstart, zend;
    if (get_long_attr(zone, s_start_pfn, &zstart) < 0 || get_long_attr(zone, s_end_pfn, &zend) < 0)
        return NULL;
    PyObject *fa = PyObject_GetAttr(zone, s_free_area);
    if (fa == NULL)
        return NULL;
    PyObject *result = NULL;
    Py_buffer st = {0}, pb = {0};
    int have_st = 0, have_pb = 0;
    if (get_attr_bytes(alloc, s_state, &st, 1) < 0)
        goto out;
    have_st = 1;
    if (get_attr_bytes(alloc, s_pageblock_mt, &pb, 0) < 0)
        goto out;
    have_pb = 1;
    unsigned char *s = st.buf, *pbmt = pb.buf;
    if (add_long_attr(zone, s_free_pages, 1L << order) < 0)
        goto out;
    long buddy_pfn = pfn;
    while (order < MAX_ORDER - 1) {
        buddy_pfn = pfn ^ (1L << order);            /* __find_buddy_pfn */
        if (check_index(buddy_pfn, st.len) < 0)
            goto out;
        if (s[buddy_pfn] != (PG_BUDDY | order) || !(zstart <= buddy_pfn && buddy_pfn < zend))
            break;
        if (order >= PAGEBLOCK_ORDER) {
            if (check_index(buddy_pfn >> PAGEBLOCK_ORDER, pb.len) < 0)
                goto out;
            long buddy_mt = pbmt[buddy_pfn >> PAGEBLOCK_ORDER];
            /* migratetype_is_mergeable */
            if (mt != buddy_mt && !(mt < MIGRATE_PCPTYPES && buddy_mt < MIGRATE_PCPTYPES))
                break;
        }
        /* del_page_from_free_list: _free_list_of's first guess, the
         * pageblock's type; else that method itself */
        if (check_index(buddy_pfn >> PAGEBLOCK_ORDER, pb.len) < 0)
            goto out;
        PyObject *key = PyLong_FromLong(buddy_pfn);
        if (key == NULL)
            goto out;
        PyObject *d = free_list(fa, order, pbmt[buddy_pfn >> PAGEBLOCK_ORDER]);
        if (d == NULL) {
            Py_DECREF(key);
            goto out;
        }
        int in = PyDict_Check(d) ? PyDict_Contains(d, key) : PySequence_Contains(d, key);
        if (in < 0) {
            Py_DECREF(d);
            Py_DECREF(key);
            goto out;
        }
        if (!in) {
            Py_DECREF(d);
            PyObject *o = PyLong_FromLong(order);
            if (o == NULL) {
                Py_DECREF(key);
                goto out;
            }
            d = PyObject_CallMethodObjArgs(alloc, s_free_list_of, zone, key, o, NULL);
            Py_DECREF(o);
            if (d == NULL) {
                Py_DECREF(key);
                goto out;
            }
        }
        int rc = PyObject_DelItem(d, key);
        Py_DECREF(d);
        Py_DECREF(key);
        if (rc < 0)
            goto out;
        s[buddy_pfn] = 0;
        pfn &= buddy_pfn;
        order++;
    }
    s[pfn] = (unsigned char)(PG_BUDDY | order);     /* set_buddy_order */
    int to_tail;
    if (fpi_to_tail)
        to_tail = 1;
    else if (order >= MAX_ORDER - 2)
        to_tail = 0;
    else {
        /* buddy_merge_likely */
        long higher = buddy_pfn & pfn;
        long hb = higher ^ (1L << (order + 1));
        if (check_index(hb, st.len) < 0)
            goto out;
        to_tail = s[hb] == (PG_BUDDY | (order + 1)) && zstart <= hb && hb < zend;
    }
    {
        PyObject *d = free_list(fa, order, mt);
        if (d == NULL)
            goto out;
        PyObject *key = PyLong_FromLong(pfn);
        if (key == NULL) {
            Py_DECREF(d);
            goto out;
        }
        int rc = PyObject_SetItem(d, key, Py_None);
        if (rc == 0 && to_tail) {
            PyObject *r = PyObject_CallMethodObjArgs(d, s_move_to_end, key, Py_False, NULL);
            if (r == NULL)
                rc = -1;
            Py_XDECREF(r);
        }
        Py_DECREF(key);
        Py_DECREF(d);
        if (rc < 0)
            goto out;
    }
    result = Py_None;
    Py_INCREF(result);
out:
    if (have_st)
        PyBuffer_Release(&st);
    if (have_pb)
        PyBuffer_Release(&pb);
    Py_DECREF(fa);
    return result;
}


/* ------------------------------------------------------------------------
 * The order-0 per-CPU list paths of one call each: __alloc_pages and
 * __free_pages when the pcp list serves them without anything else to do.
 * Each either does the whole call, exactly as the Python code would, or
 * (returning -1 / False) changes nothing and leaves the call to Python.
 */

#define ALLOC_WMARK_MASK 0x03
#define ALLOC_HARDER 0x10
#define WMARK_HIGH 2
#define MOVABLE 1
#define PG_ALLOC 0x20
#define PG_ALLOC_MOVABLE 0x30
#define PG_PCP 0x40

static PyObject *s_ac_cache, *s_pcp_autotune, *s_pcp_legacy, *s_pcp_allowed,
    *s_nr_reserved_highatomic, *s_below_high, *s_watermark, *s_lowmem_reserve, *s_pcp,
    *s_lists, *s_count, *s_free_factor, *s_free_count, *s_popleft, *s_appendleft,
    *s_allocated_once, *s_max_pfn, *s_zones_desc, *s_high, *s_batch,
    *s_free_pcppages_bulk_legacy, *s_free_pcppages_bulk, *s_nr_pcp_free,
    *s_free_unref_page_commit_autotune, *s_zero;

/* An int that is exactly 0 (no error left set for any other object). */
static int is_zero(PyObject *v)
{
    if (!PyLong_CheckExact(v))
        return 0;
    int overflow;
    long x = PyLong_AsLongAndOverflow(v, &overflow);
    return x == 0 && !overflow;
}

/* obj.name as a C long (-1 with an error set on failure: check PyErr_Occurred) */
static long attr_long(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    long r = PyLong_AsLong(v);
    Py_DECREF(v);
    return r;
}

/* obj.name truth value (-1 on error) */
static int attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* obj.name[i] as a C long */
static long attr_item_long(PyObject *obj, PyObject *name, Py_ssize_t i)
{
    PyObject *seq = PyObject_GetAttr(obj, name);
    if (seq == NULL)
        return -1;
    PyObject *v = PySequence_GetItem(seq, i);
    Py_DECREF(seq);
    if (v == NULL)
        return -1;
    long r = PyLong_AsLong(v);
    Py_DECREF(v);
    return r;
}

static int set_attr_long(PyObject *obj, PyObject *name, long value)
{
    PyObject *v = PyLong_FromLong(value);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return rc;
}

/* pcp.lists[pindex] (a new reference) */
static PyObject *pcp_list(PyObject *pcp, Py_ssize_t pindex)
{
    PyObject *lists = PyObject_GetAttr(pcp, s_lists);
    if (lists == NULL)
        return NULL;
    PyObject *lst = PySequence_GetItem(lists, pindex);
    Py_DECREF(lists);
    return lst;
}

#define BAIL_IF(cond) do { if (cond) { ret = -1; goto out; } } while (0)
#define FAIL_IF(cond) do { if (cond) { ret = -2; goto out; } } while (0)

/*
 * alloc_pages_fast(allocator, gfp, order) -> pfn, or -1 (nothing done):
 * __alloc_pages of an order-0 page of a pcp type (the gfp's cached
 * prepare_alloc_pages, no migratetype override) on its fast path, when
 * get_page_from_freelist's first zone passes zone_watermark_fast's order-0
 * shortcut (and, 6.7+, its high watermark's: ZONE_BELOW_HIGH stays as it
 * is) and rmqueue -> rmqueue_pcplist -> __rmqueue_pcplist finds the pcp
 * list non-empty: the list's head, free_factor / free_count halved,
 * prep_new_page's state byte. Anything else (a watermark to check in
 * full, a refill, another zone, an uncached gfp) is left to Python.
 */
static PyObject *py_alloc_pages_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "alloc_pages_fast(allocator, gfp, order)");
        return NULL;
    }
    PyObject *alloc = args[0], *gfp = args[1];
    if (!is_zero(args[2]))
        return PyLong_FromLong(-1);
    long ret = -1;
    PyObject *cache = NULL, *zone = NULL, *pcp = NULL, *lst = NULL, *x = NULL;
    Py_buffer st = {0};
    int have_st = 0;
    cache = PyObject_GetAttr(alloc, s_ac_cache);
    FAIL_IF(cache == NULL);
    PyObject *ac = PyDict_Check(cache) ? PyDict_GetItemWithError(cache, gfp) : NULL;  /* borrowed */
    FAIL_IF(ac == NULL && PyErr_Occurred());
    BAIL_IF(ac == NULL || !PyTuple_Check(ac) || PyTuple_GET_SIZE(ac) != 5);
    PyObject *zonelist = PyTuple_GET_ITEM(ac, 0);
    long hz = PyLong_AsLong(PyTuple_GET_ITEM(ac, 1));
    long mt = PyLong_AsLong(PyTuple_GET_ITEM(ac, 2));
    long flags = PyLong_AsLong(PyTuple_GET_ITEM(ac, 3));
    FAIL_IF(PyErr_Occurred());
    BAIL_IF(!PyTuple_Check(zonelist) || PyTuple_GET_SIZE(zonelist) == 0);
    BAIL_IF(mt < 0 || mt >= MIGRATE_PCPTYPES);
    {
        PyObject *allowed = PyObject_GetAttr(alloc, s_pcp_allowed);
        FAIL_IF(allowed == NULL);
        PyObject *a0 = PySequence_GetItem(allowed, 0);
        Py_DECREF(allowed);
        FAIL_IF(a0 == NULL);
        int ok = PyObject_IsTrue(a0);
        Py_DECREF(a0);
        FAIL_IF(ok < 0);
        BAIL_IF(!ok);
    }
    int autotune = attr_true(alloc, s_pcp_autotune);
    FAIL_IF(autotune < 0);
    /* get_page_from_freelist: the zonelist's first zone */
    zone = PyTuple_GET_ITEM(zonelist, 0);
    Py_INCREF(zone);
    long free = attr_long(zone, s_free_pages);
    long reserved = (flags & ALLOC_HARDER) ? 0 : attr_long(zone, s_nr_reserved_highatomic);
    long lowmem = attr_item_long(zone, s_lowmem_reserve, hz);
    FAIL_IF(PyErr_Occurred());
    if (autotune) {
        int below_high = attr_true(zone, s_below_high);
        FAIL_IF(below_high < 0);
        if (!below_high) {
            long high = attr_item_long(zone, s_watermark, WMARK_HIGH);
            FAIL_IF(PyErr_Occurred());
            BAIL_IF(!(free - reserved > high + lowmem));
        }
    }
    long mark = attr_item_long(zone, s_watermark, flags & ALLOC_WMARK_MASK);
    FAIL_IF(PyErr_Occurred());
    BAIL_IF(!(free - reserved > mark + lowmem));    /* zone_watermark_fast */
    /* rmqueue -> rmqueue_pcplist: order_to_pindex(mt, 0) == mt */
    pcp = PyObject_GetAttr(zone, s_pcp);
    FAIL_IF(pcp == NULL);
    lst = pcp_list(pcp, mt);
    FAIL_IF(lst == NULL);
    Py_ssize_t len = PyObject_Size(lst);
    FAIL_IF(len < 0);
    BAIL_IF(len == 0);                                 /* a refill: Python */
    FAIL_IF(get_attr_bytes(alloc, s_state, &st, 1) < 0);
    have_st = 1;
    /* from here on the call is ours: the same steps as the Python code */
    FAIL_IF(PyObject_SetAttr(alloc, s_allocated_once, Py_True) < 0);
    PyObject *factor = autotune ? s_free_count : s_free_factor;
    long f = attr_long(pcp, factor);
    FAIL_IF(f == -1 && PyErr_Occurred());
    FAIL_IF(set_attr_long(pcp, factor, f >> 1) < 0);
    FAIL_IF(add_long_attr(pcp, s_count, -1) < 0);
    x = PyObject_CallMethodNoArgs(lst, s_popleft);
    FAIL_IF(x == NULL);
    long v = PyLong_AsLong(x);
    FAIL_IF(v == -1 && PyErr_Occurred());
    long pfn = v >> 4;
    FAIL_IF(check_index(pfn, st.len) < 0);
    ((unsigned char *)st.buf)[pfn] = mt == MOVABLE ? PG_ALLOC_MOVABLE : PG_ALLOC;  /* prep_new_page */
    ret = pfn;
out:
    if (have_st)
        PyBuffer_Release(&st);
    Py_XDECREF(cache);
    Py_XDECREF(zone);
    Py_XDECREF(pcp);
    Py_XDECREF(lst);
    Py_XDECREF(x);
    if (ret == -2)
        return NULL;
    return PyLong_FromLong(ret);
}

/*
 * free_pages_fast(allocator, pfn, order) -> True, or False (nothing done):
 * __free_pages of an allocated order-0 page of a pcp type: free_the_page ->
 * free_unref_page -> free_unref_page_commit, the page onto the head of its
 * pcp list; then the scheme's drain check, whose drains (and 6.7+'s whole
 * commit tail) are the Python methods. A bad free, a page of another type
 * (HIGHATOMIC, ISOLATE, registered) or no order-0 pcp list: Python.
 */
static PyObject *py_free_pages_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "free_pages_fast(allocator, pfn, order)");
        return NULL;
    }
    PyObject *alloc = args[0];
    if (!PyLong_CheckExact(args[1]) || !is_zero(args[2]))
        Py_RETURN_FALSE;
    long pfn = PyLong_AsLong(args[1]);
    if (pfn == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    long ret = -1;
    PyObject *zones = NULL, *zone = NULL, *pcp = NULL, *lst = NULL, *x = NULL, *r = NULL,
             *n = NULL;
    Py_buffer st = {0}, pb = {0};
    int have_st = 0, have_pb = 0;
    long max_pfn = attr_long(alloc, s_max_pfn);
    FAIL_IF(max_pfn == -1 && PyErr_Occurred());
    BAIL_IF(!(0 <= pfn && pfn < max_pfn));
    FAIL_IF(get_attr_bytes(alloc, s_state, &st, 1) < 0);
    have_st = 1;
    FAIL_IF(check_index(pfn, st.len) < 0);
    unsigned char v = ((unsigned char *)st.buf)[pfn];
    BAIL_IF(v != PG_ALLOC && v != PG_ALLOC_MOVABLE);        /* bad_page: Python */
    /* page_zone: the first zone (by descending start) starting at or below pfn */
    zones = PyObject_GetAttr(alloc, s_zones_desc);
    FAIL_IF(zones == NULL);
    Py_ssize_t nz = PySequence_Size(zones);
    FAIL_IF(nz < 0);
    BAIL_IF(nz == 0);
    for (Py_ssize_t i = 0; i < nz; i++) {
        Py_XDECREF(zone);
        zone = PySequence_GetItem(zones, i);
        FAIL_IF(zone == NULL);
        long start = attr_long(zone, s_start_pfn);
        FAIL_IF(start == -1 && PyErr_Occurred());
        if (pfn >= start)
            break;
    }
    FAIL_IF(get_attr_bytes(alloc, s_pageblock_mt, &pb, 0) < 0);
    have_pb = 1;
    FAIL_IF(check_index(pfn >> PAGEBLOCK_ORDER, pb.len) < 0);
    long mt = ((unsigned char *)pb.buf)[pfn >> PAGEBLOCK_ORDER];
    BAIL_IF(mt >= MIGRATE_PCPTYPES);
    {
        PyObject *allowed = PyObject_GetAttr(alloc, s_pcp_allowed);
        FAIL_IF(allowed == NULL);
        PyObject *a0 = PySequence_GetItem(allowed, 0);
        Py_DECREF(allowed);
        FAIL_IF(a0 == NULL);
        int ok = PyObject_IsTrue(a0);
        Py_DECREF(a0);
        FAIL_IF(ok < 0);
        BAIL_IF(!ok);
    }
    int autotune = attr_true(alloc, s_pcp_autotune);
    FAIL_IF(autotune < 0);
    int legacy = attr_true(alloc, s_pcp_legacy);
    FAIL_IF(legacy < 0);
    pcp = PyObject_GetAttr(zone, s_pcp);
    FAIL_IF(pcp == NULL);
    lst = pcp_list(pcp, mt);                    /* order_to_pindex(mt, 0) == mt */
    FAIL_IF(lst == NULL);
    /* free_unref_page_commit: onto the list's head */
    x = PyLong_FromLong(pfn << 4 | mt);
    FAIL_IF(x == NULL);
    r = PyObject_CallMethodOneArg(lst, s_appendleft, x);
    FAIL_IF(r == NULL);
    Py_CLEAR(r);
    ((unsigned char *)st.buf)[pfn] = PG_PCP;
    FAIL_IF(add_long_attr(pcp, s_count, 1) < 0);
    ret = 1;
    if (autotune) {
        /* 6.7+: the rest of free_unref_page_commit (order 0, pindex mt) */
        n = PyLong_FromLong(mt);
        FAIL_IF(n == NULL);
        r = PyObject_CallMethodObjArgs(alloc, s_free_unref_page_commit_autotune, zone, pcp,
                                       s_zero, n, NULL);
        FAIL_IF(r == NULL);
        goto out;
    }
    long count = attr_long(pcp, s_count);
    long high = attr_long(pcp, s_high);
    FAIL_IF(PyErr_Occurred());
    if (legacy) {
        /* before 5.13/5.14: at high, free pcp->batch pages */
        if (count >= high) {
            PyObject *batch = PyObject_GetAttr(pcp, s_batch);
            FAIL_IF(batch == NULL);
            r = PyObject_CallMethodObjArgs(alloc, s_free_pcppages_bulk_legacy, zone, batch, pcp,
                                           NULL);
            Py_DECREF(batch);
            FAIL_IF(r == NULL);
        }
        goto out;
    }
    /* 5.13-6.6: an order-0 page is never free_high: high is pcp->high */
    if (count >= high) {
        PyObject *batch = PyObject_GetAttr(pcp, s_batch);
        FAIL_IF(batch == NULL);
        PyObject *highobj = PyLong_FromLong(high);
        if (highobj == NULL) {
            Py_DECREF(batch);
            FAIL_IF(1);
        }
        PyObject *nr = PyObject_CallMethodObjArgs(alloc, s_nr_pcp_free, pcp, highobj, batch,
                                                  Py_False, NULL);
        Py_DECREF(batch);
        Py_DECREF(highobj);
        FAIL_IF(nr == NULL);
        n = PyLong_FromLong(mt);
        if (n == NULL) {
            Py_DECREF(nr);
            FAIL_IF(1);
        }
        r = PyObject_CallMethodObjArgs(alloc, s_free_pcppages_bulk, zone, nr, pcp, n, NULL);
        Py_DECREF(nr);
        FAIL_IF(r == NULL);
    }
out:
    if (have_st)
        PyBuffer_Release(&st);
    if (have_pb)
        PyBuffer_Release(&pb);
    Py_XDECREF(zones);
    Py_XDECREF(zone);
    Py_XDECREF(pcp);
    Py_XDECREF(lst);
    Py_XDECREF(x);
    Py_XDECREF(r);
    Py_XDECREF(n);
    if (ret == -2)
        return NULL;
    if (ret == 1)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"rmqueue_smallest", (PyCFunction)(void (*)(void))py_rmqueue_smallest, METH_FASTCALL,
     "__rmqueue_smallest + expand: (allocator, zone, order, mt) -> pfn or -1"},
    {"rmqueue_bulk", (PyCFunction)(void (*)(void))py_rmqueue_bulk, METH_FASTCALL,
     "rmqueue_bulk while __rmqueue_smallest finds blocks: "
     "(allocator, zone, order, count, lst, mt, code) -> n"},
    {"free_one_page", (PyCFunction)(void (*)(void))py_free_one_page, METH_FASTCALL,
     "__free_one_page: (allocator, zone, pfn, order, mt, to_tail) -> None"},
    {"alloc_pages_fast", (PyCFunction)(void (*)(void))py_alloc_pages_fast, METH_FASTCALL,
     "__alloc_pages of an order-0 page off a non-empty pcp list: "
     "(allocator, gfp, order) -> pfn, or -1 (nothing done)"},
    {"free_pages_fast", (PyCFunction)(void (*)(void))py_free_pages_fast, METH_FASTCALL,
     "__free_pages of an order-0 page onto its pcp list: "
     "(allocator, pfn, order) -> True, or False (nothing done)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cbuddy",
    "The buddy allocator's innermost loops in C (see _cbuddy.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__cbuddy(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_free_area, "free_area");
    INTERN(s_free_pages, "free_pages");
    INTERN(s_start_pfn, "start_pfn");
    INTERN(s_end_pfn, "end_pfn");
    INTERN(s_popitem, "popitem");
    INTERN(s_move_to_end, "move_to_end");
    INTERN(s_append, "append");
    INTERN(s_state, "_state");
    INTERN(s_pageblock_mt, "_pageblock_mt");
    INTERN(s_free_list_of, "_free_list_of");
    INTERN(s_ac_cache, "_ac_cache");
    INTERN(s_pcp_autotune, "_pcp_autotune");
    INTERN(s_pcp_legacy, "_pcp_legacy");
    INTERN(s_pcp_allowed, "_pcp_allowed");
    INTERN(s_nr_reserved_highatomic, "nr_reserved_highatomic");
    INTERN(s_below_high, "below_high");
    INTERN(s_watermark, "watermark");
    INTERN(s_lowmem_reserve, "lowmem_reserve");
    INTERN(s_pcp, "pcp");
    INTERN(s_lists, "lists");
    INTERN(s_count, "count");
    INTERN(s_free_factor, "free_factor");
    INTERN(s_free_count, "free_count");
    INTERN(s_popleft, "popleft");
    INTERN(s_appendleft, "appendleft");
    INTERN(s_allocated_once, "_allocated_once");
    INTERN(s_max_pfn, "max_pfn");
    INTERN(s_zones_desc, "_zones_desc");
    INTERN(s_high, "high");
    INTERN(s_batch, "batch");
    INTERN(s_free_pcppages_bulk_legacy, "_free_pcppages_bulk_legacy");
    INTERN(s_free_pcppages_bulk, "_free_pcppages_bulk");
    INTERN(s_nr_pcp_free, "_nr_pcp_free");
    INTERN(s_free_unref_page_commit_autotune, "_free_unref_page_commit_autotune");
#undef INTERN
    if ((s_zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
