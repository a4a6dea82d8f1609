// Shared helpers of the CUDA C kernels in this folder (storage types, conversions, reductions).
//
// The kernels are compiled at run time by NVRTC through cupy.RawModule. NVRTC has no system
// headers, and cuda_bf16.h / cuda_fp16.h are not always on its include path, so this file is
// self-contained: 16-bit floats are stored as raw `unsigned short` and converted with bit
// operations (bfloat16) or one PTX instruction (float16). The Python loader pastes this file in
// place of each .cu file's include line (once per .cu, hence no include guard), so CuPy's
// compile cache key covers its content.

typedef long long i64;
typedef unsigned long long u64;

// Storage traits: store_t is the element type in memory, acc_t the arithmetic type (fp32 for
// every 16/32-bit format, fp64 for float64). load/store convert with round-to-nearest-even,
// as torch does when it writes a bfloat16/float16 tensor.
struct F32 {
    typedef float store_t;
    typedef float acc_t;
    static __device__ __forceinline__ float load(const float* p, i64 i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, i64 i, float v) { p[i] = v; }
    static __device__ __forceinline__ float round(float v) { return v; }
};

struct F64 {
    typedef double store_t;
    typedef double acc_t;
    static __device__ __forceinline__ double load(const double* p, i64 i) { return p[i]; }
    static __device__ __forceinline__ void store(double* p, i64 i, double v) { p[i] = v; }
    static __device__ __forceinline__ double round(double v) { return v; }
};

struct BF16 {
    typedef unsigned short store_t;
    typedef float acc_t;
    static __device__ __forceinline__ float to_float(unsigned short h) {
        return __uint_as_float(((unsigned int)h) << 16);  // exact: bf16 is the top half of fp32
    }
    static __device__ __forceinline__ unsigned short from_float(float v) {
        unsigned int u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        return (unsigned short)(u >> 16);
    }
    static __device__ __forceinline__ float load(const unsigned short* p, i64 i) { return to_float(p[i]); }
    static __device__ __forceinline__ void store(unsigned short* p, i64 i, float v) { p[i] = from_float(v); }
    static __device__ __forceinline__ float round(float v) { return to_float(from_float(v)); }
};

struct F16 {
    typedef unsigned short store_t;
    typedef float acc_t;
    static __device__ __forceinline__ float to_float(unsigned short h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ unsigned short from_float(float v) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return h;
    }
    static __device__ __forceinline__ float load(const unsigned short* p, i64 i) { return to_float(p[i]); }
    static __device__ __forceinline__ void store(unsigned short* p, i64 i, float v) { p[i] = from_float(v); }
    static __device__ __forceinline__ float round(float v) { return to_float(from_float(v)); }
};

__device__ __forceinline__ bool is_nan(double x) { return x != x; }  // no <cmath> under NVRTC

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// splitmix64 finaliser: a bijective 64-bit mixer with full avalanche, used as a counter-based
// random number generator (hash of seed, stream and element index).
__device__ __forceinline__ u64 mix64(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
