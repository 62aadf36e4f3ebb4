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
    PyObject *stobj = PyObject_GetAttr(alloc, s_state);
    if (stobj == NULL)
        return NULL;
    Py_buffer st;
    int rc = get_bytes(stobj, &st, 1);
    Py_DECREF(stobj);
    if (rc < 0)
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
    PyObject *stobj = PyObject_GetAttr(alloc, s_state);
    if (stobj == NULL)
        return NULL;
    Py_buffer st;
    int rc = get_bytes(stobj, &st, 1);
    Py_DECREF(stobj);
    if (rc < 0)
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
    PyObject *stobj = NULL, *pbobj = NULL, *result = NULL;
    Py_buffer st = {0}, pb = {0};
    int have_st = 0, have_pb = 0;
    stobj = PyObject_GetAttr(alloc, s_state);
    if (stobj == NULL || get_bytes(stobj, &st, 1) < 0)
        goto out;
    have_st = 1;
    pbobj = PyObject_GetAttr(alloc, s_pageblock_mt);
    if (pbobj == NULL || get_bytes(pbobj, &pb, 0) < 0)
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
            d = PyObject_CallMethod(alloc, "_free_list_of", "OOl", zone, key, order);
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
    Py_XDECREF(stobj);
    Py_XDECREF(pbobj);
    Py_DECREF(fa);
    return result;
}

static PyMethodDef methods[] = {
    {"rmqueue_smallest", (PyCFunction)(void (*)(void))py_rmqueue_smallest, METH_FASTCALL,
     "__rmqueue_smallest + expand: (allocator, zone, order, mt) -> pfn or -1"},
    {"rmqueue_bulk", (PyCFunction)(void (*)(void))py_rmqueue_bulk, METH_FASTCALL,
     "rmqueue_bulk while __rmqueue_smallest finds blocks: "
     "(allocator, zone, order, count, lst, mt, code) -> n"},
    {"free_one_page", (PyCFunction)(void (*)(void))py_free_one_page, METH_FASTCALL,
     "__free_one_page: (allocator, zone, pfn, order, mt, to_tail) -> None"},
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
#undef INTERN
    return PyModule_Create(&module);
}
