/* Shared by the CPU kernels: element types of the weights (wtype) and their exact widening
 * from 16 bits to float32. */
#ifndef LOWRANK_WIDEN_H
#define LOWRANK_WIDEN_H

#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

/* Element types of W (wtype). */
#define WTYPE_F32 0
#define WTYPE_BF16 1
#define WTYPE_F16 2

/* float16 bits -> float32, exact for every value (subnormals, inf, NaN payloads); the
 * portable path (GCC's _Float16 conversion is a libgcc call without AVX512-FP16). */
static inline float half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, em = h & 0x7fff;
    uint32_t bits = em << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    f *= 0x1p112f; /* rebias 15 -> 127; a subnormal half becomes a normal float exactly */
    memcpy(&bits, &f, sizeof f);
    if (em >= 0x7c00) bits = (em << 13) | 0x7f800000; /* inf, NaN (payload kept) */
    bits |= sign;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* len 16-bit weights at src -> float32 at dst (bfloat16: the top half of a float32). */
static inline void widen(const uint16_t *restrict src, int wtype, float *restrict dst, int64_t len)
{
    int64_t j = 0;
    if (wtype == WTYPE_BF16) {
        for (; j < len; j++) {
            const uint32_t bits = (uint32_t)src[j] << 16;
            memcpy(dst + j, &bits, sizeof bits);
        }
        return;
    }
#ifdef __F16C__
    for (; j + 8 <= len; j += 8) /* vcvtph2ps, 8 at a time */
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
#endif
    for (; j < len; j++) dst[j] = half_to_float(src[j]);
}

#endif /* LOWRANK_WIDEN_H */
