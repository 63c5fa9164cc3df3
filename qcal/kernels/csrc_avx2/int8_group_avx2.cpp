/* qcal: the grouped int8 weight-only operator (w8a16_group_mm) in the AVX2 library: csrc/int8_group.h, compiled
   into the AVX-512 library as well (csrc/int8_group_mm.cpp): the same numbers. */
#include "int8_group.h"
