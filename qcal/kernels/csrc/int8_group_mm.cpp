/* qcal: the grouped int8 weight-only operator (w8a16_group_mm) in the AVX-512 library; the kernel and the operator
   are int8_group.h's, compiled into the AVX2 library as well (csrc_avx2/int8_group_avx2.cpp): the same numbers. */
#include "int8_group.h"
