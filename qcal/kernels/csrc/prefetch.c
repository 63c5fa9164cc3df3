/* The learned call-order table behind qcal's next-call weight prefetch (see prefetch.h). */
#include "prefetch.h"

#define PF_SLOTS 1024

static qcal_next_call pf_table[PF_SLOTS];
static const uint8_t *pf_last;
static int pf_enabled = 0; /* qcal.kernels.native.set_prefetch / QCAL_PREFETCH=1 */

void qcal_set_prefetch(int on) { pf_enabled = on; }

static size_t pf_slot(const void *p) { return (size_t)(((uintptr_t)p >> 6) * 2654435761u % PF_SLOTS); }

qcal_next_call qcal_pf_step(const uint8_t *w, int64_t units, int64_t unit_bytes, const void *aux,
                            int64_t aux_unit_bytes) {
    qcal_next_call none = {0, 0, 0, 0, 0, 0};
    if (!pf_enabled) return none;
    if (pf_last && pf_last != w) {
        qcal_next_call e = {pf_last, w, (const uint8_t *)aux, units, unit_bytes, aux_unit_bytes};
        pf_table[pf_slot(pf_last)] = e;
    }
    pf_last = w;
    qcal_next_call next = pf_table[pf_slot(w)];
    return next.key == w ? next : none;
}
