/* The dispatch of a tile function over its compile-time shape: RB weight rows or blocks (1..4, or 1..2 with
   QCAL_RB2_X_MB) x MB input rows (1..4), from run-time `rb` and `mb` in scope (so that each shape's loops
   unroll). */
#ifndef QCAL_TILES_H
#define QCAL_TILES_H

#define QCAL_RB2_CASES(TILE)                                                                                       \
    case 5: TILE(1, 1); break;                                                                                     \
    case 6: TILE(1, 2); break;                                                                                     \
    case 7: TILE(1, 3); break;                                                                                     \
    case 8: TILE(1, 4); break;                                                                                     \
    case 9: TILE(2, 1); break;                                                                                     \
    case 10: TILE(2, 2); break;                                                                                    \
    case 11: TILE(2, 3); break;

#define QCAL_RB2_X_MB(TILE)                                                                                        \
    switch (rb * 4 + mb) {                                                                                         \
        QCAL_RB2_CASES(TILE)                                                                                       \
    default: TILE(2, 4); break;                                                                                    \
    }

#define QCAL_RB_X_MB(TILE)                                                                                         \
    switch (rb * 4 + mb) {                                                                                         \
        QCAL_RB2_CASES(TILE)                                                                                       \
    case 12: TILE(2, 4); break;                                                                                    \
    case 13: TILE(3, 1); break;                                                                                    \
    case 14: TILE(3, 2); break;                                                                                    \
    case 15: TILE(3, 3); break;                                                                                    \
    case 16: TILE(3, 4); break;                                                                                    \
    case 17: TILE(4, 1); break;                                                                                    \
    case 18: TILE(4, 2); break;                                                                                    \
    case 19: TILE(4, 3); break;                                                                                    \
    default: TILE(4, 4); break;                                                                                    \
    }

#endif
