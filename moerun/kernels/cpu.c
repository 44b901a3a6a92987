/* moerun's CPU kernels: the routed experts of one MoE layer straight from their stored
 * bytes (every weight byte read once, decoded in registers and multiplied, never written
 * back as a dequantized matrix), and dense layers at a few tokens (the GEMVs of a decode
 * step). A MoE call groups the (token, expert) pairs by expert here, then computes gate+up
 * rows (phase 1) and down rows (phase 2), each split into one contiguous range per thread
 * of torch's own OpenMP team: this module links the libgomp torch has already loaded, so
 * no second pool competes for the cores.
 *
 * Formats (moerun/quant): NF4 (bitsandbytes' layout: blocks of 64 row-major values, one
 * float32 absmax each, two codes per byte, first value in the high nibble), int8 with
 * one float32 scale per row, and 16-bit weights (bf16 / fp16 / fp32). Activations,
 * accumulators and the output are float32; x may be fp32, bf16 or fp16.
 *
 * NF4 trick: a byte holds elements 2i (high nibble) and 2i+1 (low nibble). Instead of
 * interleaving decoded weights, the activation vector is permuted once per call so that
 * each group of 2V elements reads [even elements | odd elements] (V = vector lanes):
 * then high nibbles multiply the first V, low nibbles the second V.
 *
 * Shape legend: N tokens, K experts per token, E experts, P (token, expert) pairs,
 * D hidden, I expert intermediate.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define MOERUN_X86 1
#include <immintrin.h>
#endif

/* ---- formats ---------------------------------------------------------------------- */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { ACT_SILU = 0, ACT_SWIGLU_CLAMPED = 1 };
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
/* Columns of the per-expert address table (int64 [E, 6]; 0 = absent). */
enum { T_W13 = 0, T_W13S, T_W2, T_W2S, T_B13, T_B2, T_COLS };

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

static int g_isa = -1; /* chosen on first use, or forced by set_isa() */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_scalar(const void *p, int64_t i, int dtype) {
    switch (dtype) {
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* ---- matrix layouts ------------------------------------------------------------------ *
 * The vector paths load whole 32-bit words of weights and take their parts apart with
 * shifts (ALU work) instead of widening loads and byte shuffles, which are the scarce
 * resource: a 16-lane vector of words holds 16 x 8 NF4 codes, 16 x 4 int8 or 16 x 2 bf16
 * values, and part s of lane i is element (elements-per-word * i + s') of the group. The
 * activation vector is permuted once per call to that order, so every weight meets its
 * activation with no shuffle at all. A matrix whose rows are not whole groups (odd shapes)
 * takes the plain row-major path (NF4: a scalar one, as its blocks then straddle rows). */

enum {
    MODE_SCALAR = 0, /* any shape, row-major, double accumulation */
    MODE_DENSE,      /* int8 / 16-bit, row-major, masked tails */
    MODE_NF4_WORDS,  /* NF4 with AVX-512, rows of whole groups of 128 values */
    MODE_NF4_PAIRS,  /* NF4 with AVX-512 where rows are whole 64-blocks but not 128-groups */
    MODE_I8_WORDS,   /* int8, rows of whole groups of 4V */
    MODE_BF16_WORDS, /* bf16, rows of whole groups of 2V */
    MODE_NF4_BYTES,  /* NF4 with AVX2, rows of whole 64-blocks: levels looked up bytewise */
    /* bf16 activations and vdpbf16ps (AVX-512 BF16): the activation vector is bf16 */
    MODE_NF4_DP,  /* NF4 dequantized to bf16 pairs, rows of whole 128-groups */
    MODE_I8_DP,   /* int8 dequantized to bf16 pairs, rows of whole 64-groups */
    MODE_BF16_DP, /* bf16 weights as they are, rows of whole 32-groups */
};

/* One matrix of a layer as the row kernels see it. */
typedef struct {
    int bits;     /* 4, 8, 16 */
    int wdtype;   /* 16-bit storage dtype (DT_*) */
    int64_t cols; /* K: the length of a row */
    int mode;     /* MODE_* */
    int V;        /* 32-bit lanes of the ISA's vectors (16 AVX-512, 8 AVX2) */
} matrix_t;

static int g_bf16dp = -1; /* the CPU has AVX-512 BF16 (and it is not turned off by set_isa) */

/* The mode a matrix is read in. bf16_x: the activations are bf16 and the bf16 dot-product
 * path is wanted (else they are float32). */
static matrix_t make_matrix(int isa, int bits, int wdtype, int64_t K, int bf16_x) {
    const int V = isa == ISA_AVX512 ? 16 : isa == ISA_AVX2 ? 8 : 0;
    matrix_t m = {bits, wdtype, K, MODE_SCALAR, V};
    if (!V) return m;
    if (bf16_x && V == 16 && g_bf16dp > 0) {
        const int mode = bits == 4 ? (K % 128 == 0 ? MODE_NF4_DP : -1)
                         : bits == 8 ? (K % 64 == 0 ? MODE_I8_DP : -1)
                                     : (wdtype == DT_BF16 && K % 32 == 0 ? MODE_BF16_DP : -1);
        if (mode >= 0) {
            m.mode = mode;
            return m;
        }
    }
    if (bits == 4)
        m.mode = V == 8       ? (K % 64 == 0 ? MODE_NF4_BYTES : MODE_SCALAR)
                 : K % (8 * V) == 0 ? MODE_NF4_WORDS
                 : K % 64 == 0      ? MODE_NF4_PAIRS
                                    : MODE_SCALAR;
    else if (bits == 8)
        m.mode = K % (4 * V) == 0 ? MODE_I8_WORDS : MODE_DENSE;
    else
        m.mode = (wdtype == DT_BF16 && K % (2 * V) == 0) ? MODE_BF16_WORDS : MODE_DENSE;
    return m;
}

static inline int is_dp(const matrix_t *m) { return m->mode >= MODE_NF4_DP; }

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Store activation element k of a vector in the matrix's order and element type. */
static inline void put_act(const matrix_t *m, void *vec, int64_t pos, float value) {
    if (is_dp(m))
        ((uint16_t *)vec)[pos] = f32_to_bf16(value);
    else
        ((float *)vec)[pos] = value;
}

/* Where element k of a K-vector sits in the order the matrix's rows are read in. */
static inline int64_t layout_pos(const matrix_t *m, int64_t k) {
    const int64_t V = m->V;
    int64_t per_word, s;
    switch (m->mode) {
    case MODE_NF4_WORDS: per_word = 8; break;
    case MODE_I8_WORDS: per_word = 4; break;
    case MODE_BF16_WORDS: per_word = 2; break;
    case MODE_NF4_BYTES: { /* value j of a 64-block: byte i = j / 2, its nibble (odd: low) */
        const int64_t j = k % 64, i = j >> 1;
        return k - j + 32 * (j & 1) + 8 * ((i & 15) >> 2) + 4 * (i >> 4) + (i & 3);
    }
    case MODE_NF4_PAIRS: { /* per 32 values: [even | odd], as a byte's two nibbles */
        const int64_t j = k % 32;
        return k - j + ((j & 1) ? 16 + (j >> 1) : (j >> 1));
    }
    case MODE_NF4_DP: { /* value j of a 128-group: lane j / 8 of decoded vector p = (j % 8) ^ 1 */
        const int64_t j = k % 128, p = (j % 8) ^ 1;
        return k - j + (p / 2) * 32 + (p % 2) * 16 + j / 8;
    }
    case MODE_I8_DP: { /* value j of a 64-group: lane j / 4 of decoded vector p = j % 4 */
        const int64_t j = k % 64, p = j % 4;
        return k - j + (p / 2) * 32 + (p % 2) * 16 + j / 4;
    }
    default: return k;
    }
    const int64_t G = per_word * V, j = k % G, lane = j / per_word;
    s = j % per_word;
    if (m->mode == MODE_NF4_WORDS) s ^= 1; /* nibble 0 of a byte (its low bits) is the odd element */
    return k - j + s * V + lane;
}

/* ---- row kernels: out[t] = W[row] . xs[t] for nt <= 8 token vectors --------------- */

#define MAXT 8
/* Each weight loop asks for the line PREFETCH_BYTES ahead of the one it reads: the
 * hardware prefetchers alone left the NF4 decode loop (compute between loads) at ~19 GB/s
 * from RAM, against ~28 with this, on the development machine (tried 0.5-8 KiB; 2-8 flat). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH_BYTES, _MM_HINT_T0)
/* Independent accumulators per token, so that few tokens still keep the FMA pipes busy
 * (one chain would wait out the FMA latency at every step). */
#define SPLIT(NT) ((NT) >= 4 ? 1 : 4 / (NT))
#define INLINE static inline __attribute__((always_inline))

static void rows_scalar(const matrix_t *m, const void *w, const float *scale, int64_t row,
                        const float *const *xs, int nt, float *out) {
    const int64_t K = m->cols;
    for (int t = 0; t < nt; t++) {
        const float *x = xs[t];
        double acc = 0.0; /* the fallback for odd shapes: accuracy over speed */
        if (m->bits == 4) {
            const uint8_t *q = (const uint8_t *)w;
            for (int64_t k = 0; k < K; k++) {
                int64_t f = row * K + k;
                uint8_t byte = q[f >> 1];
                int code = (f & 1) ? (byte & 15) : (byte >> 4);
                acc += (double)(NF4[code] * scale[f >> 6]) * x[k];
            }
        } else if (m->bits == 8) {
            const int8_t *q = (const int8_t *)w + row * K;
            for (int64_t k = 0; k < K; k++) acc += (double)(q[k] * scale[row]) * x[k];
        } else {
            for (int64_t k = 0; k < K; k++) acc += (double)load_scalar(w, row * K + k, m->wdtype) * x[k];
        }
        out[t] = (float)acc;
    }
}

/* Instantiate `name##_n(..., nt)` dispatching to an always-inlined body with a
 * compile-time token count, so the accumulators live in registers. */
#define BY_TOKENS(ATTR, name, params, args)                                           \
    ATTR static void name##_n params {                                               \
        switch (nt) {                                                                \
        case 1: name args(1); break;                                                 \
        case 2: name args(2); break;                                                 \
        case 3: name args(3); break;                                                 \
        case 4: name args(4); break;                                                 \
        case 5: name args(5); break;                                                 \
        case 6: name args(6); break;                                                 \
        case 7: name args(7); break;                                                 \
        default: name args(8); break;                                                \
        }                                                                            \
    }
#define ARGS(...) (__VA_ARGS__,
#define CALL(...) __VA_ARGS__)

#ifdef MOERUN_X86

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* NF4 words: 64 bytes = 128 values = two absmax blocks (lanes 0-7, lanes 8-15). */
AVX512 INLINE void nf4w_avx512(const uint8_t *q, const float *absmax, int64_t K,
                               const float *const *xs, float *out, const int NT) {
    const __m512 lut = _mm512_loadu_ps(NF4);
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 128; g++) {
        PREFETCH(q + 64 * g);
        const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * g));
        const __m512 s = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(absmax[2 * g]), _mm512_set1_ps(absmax[2 * g + 1]));
        if (NT == 1) { /* scale the group's sum once instead of every weight vector */
            const float *x = xs[0] + 128 * g;
            /* permutexvar reads only the low 4 bits of each index: shifts, no masks.
               Four short chains, so the FMA latency is hidden within one group. */
            __m512 c[4];
            for (int p = 0; p < 4; p++)
                c[p] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * p), lut), _mm512_loadu_ps(x + 16 * p));
            for (int p = 4; p < 8; p++)
                c[p - 4] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * p), lut),
                                           _mm512_loadu_ps(x + 16 * p), c[p - 4]);
            acc[0] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])), s, acc[0]);
        } else {
            for (int p = 0; p < 8; p++) {
                const __m512 wv = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * p), lut), s);
                for (int t = 0; t < NT; t++)
                    acc[t * A + p % A] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[t] + 128 * g + 16 * p), acc[t * A + p % A]);
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512, nf4w_avx512, (const uint8_t *q, const float *a, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(q, a, K, xs, out) CALL)

/* Four NF4 rows against one token: each activation vector is loaded once for all four
 * rows (a long row's activations come from L2, and would otherwise cost more loads than
 * its weights). */
AVX512 static void nf4w_avx512_rows4(const uint8_t *q, const float *absmax, int64_t K, const float *x, float *out) {
    const __m512 lut = _mm512_loadu_ps(NF4);
    const int64_t row_bytes = K / 2, row_blocks = K / 64;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < K / 128; g++) {
        __m512 xv[8];
        for (int p = 0; p < 8; p++) xv[p] = _mm512_loadu_ps(x + 128 * g + 16 * p);
        for (int r = 0; r < 4; r++) {
            PREFETCH(q + r * row_bytes + 64 * g);
            const __m512i v = _mm512_loadu_si512((const void *)(q + r * row_bytes + 64 * g));
            const float *a = absmax + r * row_blocks + 2 * g;
            const __m512 s = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a[0]), _mm512_set1_ps(a[1]));
            __m512 c0 = _mm512_mul_ps(_mm512_permutexvar_ps(v, lut), xv[0]);
            __m512 c1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), xv[1]);
            c0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), lut), xv[2], c0);
            c1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), lut), xv[3], c1);
            c0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), lut), xv[4], c0);
            c1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), lut), xv[5], c1);
            c0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), lut), xv[6], c0);
            c1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), lut), xv[7], c1);
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(c0, c1), s, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

AVX512 static void i8w_avx512_rows4(const int8_t *q, int64_t K, const float *x, float *out) {
    __m512 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 64; g++) {
        const __m512 x0 = _mm512_loadu_ps(x + 64 * g), x1 = _mm512_loadu_ps(x + 64 * g + 16);
        const __m512 x2 = _mm512_loadu_ps(x + 64 * g + 32), x3 = _mm512_loadu_ps(x + 64 * g + 48);
        for (int r = 0; r < 4; r++) {
            PREFETCH(q + r * K + 64 * g);
            const __m512i v = _mm512_loadu_si512((const void *)(q + r * K + 64 * g));
            acc[2 * r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), x0, acc[2 * r]);
            acc[2 * r + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), x1, acc[2 * r + 1]);
            acc[2 * r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), x2, acc[2 * r]);
            acc[2 * r + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), x3, acc[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * r], acc[2 * r + 1]));
}

AVX512 static void bf16w_avx512_rows4(const uint16_t *w, int64_t K, const float *x, float *out) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        const __m512 x0 = _mm512_loadu_ps(x + 32 * g), x1 = _mm512_loadu_ps(x + 32 * g + 16);
        for (int r = 0; r < 4; r++) {
            PREFETCH(w + r * K + 32 * g);
            const __m512i v = _mm512_loadu_si512((const void *)(w + r * K + 32 * g));
            acc[2 * r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), x0, acc[2 * r]);
            acc[2 * r + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), x1, acc[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * r], acc[2 * r + 1]));
}

/* NF4 pairs (rows of whole 64-blocks only): bytes widened to lanes, [even | odd] order. */
AVX512 INLINE void nf4p_avx512(const uint8_t *q, const float *absmax, int64_t K,
                               const float *const *xs, float *out, const int NT) {
    const __m512 lut = _mm512_loadu_ps(NF4);
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / 64; b++) {
        const __m512 s = _mm512_set1_ps(absmax[b]);
        for (int h = 0; h < 2; h++) {
            const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * b + 16 * h)));
            const __m512 we = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut), s);
            const __m512 wo = _mm512_mul_ps(_mm512_permutexvar_ps(c, lut), s);
            for (int t = 0; t < NT; t++) {
                const float *x = xs[t] + 64 * b + 32 * h;
                acc[t * A + (2 * h) % A] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x), acc[t * A + (2 * h) % A]);
                acc[t * A + (2 * h + 1) % A] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 16), acc[t * A + (2 * h + 1) % A]);
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512, nf4p_avx512, (const uint8_t *q, const float *a, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(q, a, K, xs, out) CALL)

/* int8 words: part p of a word is its byte p, sign-extended by a shift pair. */
AVX512 INLINE void i8w_avx512(const int8_t *q, int64_t K, const float *const *xs, float *out, const int NT) {
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 64; g++) {
        PREFETCH(q + 64 * g);
        const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * g));
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24));
        const __m512 w2 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24));
        const __m512 w3 = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
        for (int t = 0; t < NT; t++) {
            const float *x = xs[t] + 64 * g;
            acc[t * A + 0 % A] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc[t * A + 0 % A]);
            acc[t * A + 1 % A] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc[t * A + 1 % A]);
            acc[t * A + 2 % A] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + 32), acc[t * A + 2 % A]);
            acc[t * A + 3 % A] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + 48), acc[t * A + 3 % A]);
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512, i8w_avx512, (const int8_t *q, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(q, K, xs, out) CALL)

/* bf16 words: the low half shifted up, the high half masked: both exact float32. */
AVX512 INLINE void bf16w_avx512(const uint16_t *w, int64_t K, const float *const *xs, float *out, const int NT) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        PREFETCH(w + 32 * g);
        const __m512i v = _mm512_loadu_si512((const void *)(w + 32 * g));
        const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        for (int t = 0; t < NT; t++) {
            const float *x = xs[t] + 32 * g;
            acc[t * A + (2 * g) % A] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc[t * A + (2 * g) % A]);
            acc[t * A + (2 * g + 1) % A] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc[t * A + (2 * g + 1) % A]);
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512, bf16w_avx512, (const uint16_t *w, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(w, K, xs, out) CALL)

/* Row-major int8 / 16-bit, any length (masked tail): 16 weights widened to float32. */
AVX512 INLINE __m512 load16_avx512(int bits, int wdtype, const void *w, int64_t i, __mmask16 mask) {
    if (bits == 8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, (const int8_t *)w + i)));
    switch (wdtype) {
    case DT_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)w + i)), 16));
    case DT_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)w + i));
    default: return _mm512_maskz_loadu_ps(mask, (const float *)w + i);
    }
}

AVX512 INLINE void dense_avx512(int bits, int wdtype, const void *w, int64_t K, const float *const *xs,
                                float *out, const int NT) {
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 wv = load16_avx512(bits, wdtype, w, k, mask);
        for (int t = 0; t < NT; t++) acc[t * A + (k / 16) % A] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, xs[t] + k), acc[t * A + (k / 16) % A]);
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512, dense_avx512, (int bits, int wdtype, const void *w, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(bits, wdtype, w, K, xs, out) CALL)


/* ---- AVX-512 BF16: bf16 activations, dot products of bf16 pairs (vdpbf16ps) --------- *
 * With a bf16 model the activations already are bf16, and a weight dequantized to bf16
 * is what the reference (dequantize, then a bf16 matmul) multiplies too: level x absmax
 * (or int8 x scale) in float32, rounded to bf16 (RNE). One vdpbf16ps does 32 multiply-
 * adds where an FMA does 16, and the activations are half the bytes, so prompts (several
 * tokens per expert) and 16-bit weights go this way. Products are exact in float32. */

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

/* NF4: 64 bytes = 128 values; word w of pair vector q holds the value that lane w % 16 of
 * decoded vector 2q + w / 16 holds (see layout_pos). */
AVX512BF16 INLINE void nf4dp_avx512(const uint8_t *q, const float *absmax, int64_t K, const void *const *xs,
                                    float *out, const int NT) {
    const __m512 lut = _mm512_loadu_ps(NF4);
    const int A = SPLIT(NT);
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 128; g++) {
        PREFETCH(q + 64 * g);
        const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * g));
        const __m512 s = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(absmax[2 * g]), _mm512_set1_ps(absmax[2 * g + 1]));
        __m512bh pairs[4];
        for (int p = 0; p < 4; p++) {
            const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * p), lut), s);
            const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * p + 4), lut), s);
            pairs[p] = _mm512_cvtne2ps_pbh(hi, lo);
        }
        for (int t = 0; t < NT; t++) {
            const uint16_t *x = (const uint16_t *)xs[t] + 128 * g;
            for (int p = 0; p < 4; p++)
                acc[t * A + p % A] = _mm512_dpbf16_ps(acc[t * A + p % A], pairs[p],
                                                      (__m512bh)_mm512_loadu_si512((const void *)(x + 32 * p)));
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512BF16, nf4dp_avx512, (const uint8_t *q, const float *a, int64_t K, const void *const *xs, float *out, int nt),
          ARGS(q, a, K, xs, out) CALL)

/* int8: 64 bytes = 64 values, times the row's scale, as pairs (bytes 0 and 1, 2 and 3). */
AVX512BF16 INLINE void i8dp_avx512(const int8_t *q, float scale, int64_t K, const void *const *xs, float *out,
                                   const int NT) {
    const __m512 s = _mm512_set1_ps(scale);
    const int A = SPLIT(NT);
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 64; g++) {
        PREFETCH(q + 64 * g);
        const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * g));
        const __m512 b0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), s);
        const __m512 b1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), s);
        const __m512 b2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), s);
        const __m512 b3 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), s);
        const __m512bh p0 = _mm512_cvtne2ps_pbh(b1, b0), p1 = _mm512_cvtne2ps_pbh(b3, b2);
        for (int t = 0; t < NT; t++) {
            const uint16_t *x = (const uint16_t *)xs[t] + 64 * g;
            acc[t * A] = _mm512_dpbf16_ps(acc[t * A], p0, (__m512bh)_mm512_loadu_si512((const void *)x));
            acc[t * A + 1 % A] = _mm512_dpbf16_ps(acc[t * A + 1 % A], p1, (__m512bh)_mm512_loadu_si512((const void *)(x + 32)));
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512BF16, i8dp_avx512, (const int8_t *q, float s, int64_t K, const void *const *xs, float *out, int nt),
          ARGS(q, s, K, xs, out) CALL)

/* bf16 weights: in natural order, 32 per load, no decoding at all. */
AVX512BF16 INLINE void bf16dp_avx512(const uint16_t *w, int64_t K, const void *const *xs, float *out, const int NT) {
    const int A = SPLIT(NT);
    __m512 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        PREFETCH(w + 32 * g);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + 32 * g));
        for (int t = 0; t < NT; t++)
            acc[t * A + g % A] = _mm512_dpbf16_ps(acc[t * A + g % A], wv,
                                                  (__m512bh)_mm512_loadu_si512((const void *)((const uint16_t *)xs[t] + 32 * g)));
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = _mm512_reduce_add_ps(acc[t * A]);
    }
}
BY_TOKENS(AVX512BF16, bf16dp_avx512, (const uint16_t *w, int64_t K, const void *const *xs, float *out, int nt),
          ARGS(w, K, xs, out) CALL)

/* ---- AVX2: 8 lanes; a 16-entry lookup is two 8-entry permutes and a blend ---------- */

AVX2 INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* NF4 bytes, AVX2: 32 bytes = 64 values = one absmax block. A 16-entry float lookup is
 * four byte lookups (vpshufb, one per byte of the float32 levels, 32 codes each) and two
 * rounds of unpacks that put each code's four bytes together: 24 one-cycle shuffles per
 * 64 weights, where two vpermps and a blend per 8 weights (the words layout) wait on
 * vpermps' throughput on Zen 3. The unpacks leave float p of vector f (0-3) holding byte
 * 16 (p / 4) + 4 f + p % 4 of the block, the high nibbles (even values) first, then the
 * low (odd): the activations are laid out to match (layout_pos). Exact: the same float32
 * levels, each block's sum scaled by its absmax. */
AVX2 INLINE void nf4b_avx2(const uint8_t *q, const float *absmax, int64_t K, const float *const *xs,
                           float *out, const int NT) {
    __m256i table[4];
    for (int j = 0; j < 4; j++) {
        uint8_t plane[16];
        for (int c = 0; c < 16; c++) {
            uint32_t u;
            memcpy(&u, &NF4[c], 4);
            plane[c] = (uint8_t)(u >> (8 * j));
        }
        table[j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)plane));
    }
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const int A = NT <= 2 ? 2 : 1; /* chains per token within a block */
    __m256 acc[MAXT], part[MAXT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 64; b++) {
        PREFETCH(q + 32 * b);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        for (int t = 0; t < NT * A; t++) part[t] = _mm256_setzero_ps();
        for (int h = 0; h < 2; h++) {
            const __m256i codes = h ? _mm256_and_si256(v, nibble) : _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            const __m256i b0 = _mm256_shuffle_epi8(table[0], codes), b1 = _mm256_shuffle_epi8(table[1], codes);
            const __m256i b2 = _mm256_shuffle_epi8(table[2], codes), b3 = _mm256_shuffle_epi8(table[3], codes);
            const __m256i w01lo = _mm256_unpacklo_epi8(b0, b1), w01hi = _mm256_unpackhi_epi8(b0, b1);
            const __m256i w23lo = _mm256_unpacklo_epi8(b2, b3), w23hi = _mm256_unpackhi_epi8(b2, b3);
            const __m256 f[4] = {
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01lo, w23lo)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01lo, w23lo)),
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01hi, w23hi)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01hi, w23hi)),
            };
            for (int g = 0; g < 4; g++)
                for (int t = 0; t < NT; t++)
                    part[t * A + g % A] =
                        _mm256_fmadd_ps(f[g], _mm256_loadu_ps(xs[t] + 64 * b + 32 * h + 8 * g), part[t * A + g % A]);
        }
        const __m256 s = _mm256_set1_ps(absmax[b]);
        for (int t = 0; t < NT; t++) {
            const __m256 sum = A == 2 ? _mm256_add_ps(part[2 * t], part[2 * t + 1]) : part[t];
            acc[t] = _mm256_fmadd_ps(sum, s, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t] = hsum256(acc[t]);
}
BY_TOKENS(AVX2, nf4b_avx2, (const uint8_t *q, const float *a, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(q, a, K, xs, out) CALL)

AVX2 INLINE void i8w_avx2(const int8_t *q, int64_t K, const float *const *xs, float *out, const int NT) {
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m256 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        PREFETCH(q + 32 * g);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * g));
        for (int p = 0; p < 4; p++) {
            const __m256i part = p == 3 ? _mm256_srai_epi32(v, 24) : _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * p), 24);
            const __m256 wv = _mm256_cvtepi32_ps(part);
            for (int t = 0; t < NT; t++) acc[t * A + p % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t] + 32 * g + 8 * p), acc[t * A + p % A]);
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm256_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = hsum256(acc[t * A]);
    }
}
BY_TOKENS(AVX2, i8w_avx2, (const int8_t *q, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(q, K, xs, out) CALL)

AVX2 INLINE void bf16w_avx2(const uint16_t *w, int64_t K, const float *const *xs, float *out, const int NT) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m256 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 16; g++) {
        PREFETCH(w + 16 * g);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 * g));
        const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for (int t = 0; t < NT; t++) {
            acc[t * A + (2 * g) % A] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[t] + 16 * g), acc[t * A + (2 * g) % A]);
            acc[t * A + (2 * g + 1) % A] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[t] + 16 * g + 8), acc[t * A + (2 * g + 1) % A]);
        }
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm256_add_ps(acc[t * A], acc[t * A + a]);
        out[t] = hsum256(acc[t * A]);
    }
}
BY_TOKENS(AVX2, bf16w_avx2, (const uint16_t *w, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(w, K, xs, out) CALL)

/* Four bf16 rows against one token, AVX2: each activation vector loaded once for the
 * four, and four weight streams in flight instead of one. */
AVX2 static void bf16w_avx2_rows4(const uint16_t *w, int64_t K, const float *x, float *out) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 16; g++) {
        const __m256 x0 = _mm256_loadu_ps(x + 16 * g), x1 = _mm256_loadu_ps(x + 16 * g + 8);
        for (int r = 0; r < 4; r++) {
            PREFETCH(w + r * K + 16 * g);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * K + 16 * g));
            acc[2 * r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), x0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), x1, acc[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum256(_mm256_add_ps(acc[2 * r], acc[2 * r + 1]));
}

AVX2 INLINE __m256 load8_avx2(int bits, int wdtype, const void *w, int64_t i) {
    if (bits == 8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    switch (wdtype) {
    case DT_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    case DT_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    default: return _mm256_loadu_ps((const float *)w + i);
    }
}

AVX2 INLINE void dense_avx2(int bits, int wdtype, const void *w, int64_t K, const float *const *xs,
                            float *out, const int NT) {
    const int A = SPLIT(NT); /* NT * A <= MAXT */
    __m256 acc[MAXT];
    for (int t = 0; t < NT * A; t++) acc[t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 wv = load8_avx2(bits, wdtype, w, k);
        for (int t = 0; t < NT; t++) acc[t * A + (k / 8) % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t] + k), acc[t * A + (k / 8) % A]);
    }
    for (int t = 0; t < NT; t++) {
        for (int a = 1; a < A; a++) acc[t * A] = _mm256_add_ps(acc[t * A], acc[t * A + a]);
        float s = hsum256(acc[t * A]);
        for (int64_t j = k; j < K; j++)
            s += (bits == 8 ? (float)((const int8_t *)w)[j] : load_scalar(w, j, wdtype)) * xs[t][j];
        out[t] = s;
    }
}
BY_TOKENS(AVX2, dense_avx2, (int bits, int wdtype, const void *w, int64_t K, const float *const *xs, float *out, int nt),
          ARGS(bits, wdtype, w, K, xs, out) CALL)

#endif /* MOERUN_X86 */

/* out[t] = W[row] . xs[t] for nt <= MAXT tokens; xs are in the matrix's layout order. */
static void dot_row(const matrix_t *m, const void *w, const float *scale, int64_t row,
                    const void *const *xv, int nt, float *out) {
    const int64_t K = m->cols;
    const float *const *xs = (const float *const *)xv;
#ifdef MOERUN_X86
    const int wide = m->V == 16;
    switch (m->mode) {
    case MODE_NF4_DP:
        nf4dp_avx512_n((const uint8_t *)w + row * (K / 2), scale + row * (K / 64), K, xv, out, nt);
        return;
    case MODE_I8_DP:
        i8dp_avx512_n((const int8_t *)w + row * K, scale[row], K, xv, out, nt);
        return;
    case MODE_BF16_DP:
        bf16dp_avx512_n((const uint16_t *)w + row * K, K, xv, out, nt);
        return;
    case MODE_NF4_WORDS: {
        const uint8_t *q = (const uint8_t *)w + row * (K / 2);
        nf4w_avx512_n(q, scale + row * (K / 64), K, xs, out, nt); /* AVX2 reads NF4 as bytes */
        return;
    }
    case MODE_NF4_BYTES:
        nf4b_avx2_n((const uint8_t *)w + row * (K / 2), scale + row * (K / 64), K, xs, out, nt);
        return;
    case MODE_NF4_PAIRS:
        nf4p_avx512_n((const uint8_t *)w + row * (K / 2), scale + row * (K / 64), K, xs, out, nt);
        return;
    case MODE_I8_WORDS:
        (wide ? i8w_avx512_n : i8w_avx2_n)((const int8_t *)w + row * K, K, xs, out, nt);
        for (int t = 0; t < nt; t++) out[t] *= scale[row];
        return;
    case MODE_BF16_WORDS:
        (wide ? bf16w_avx512_n : bf16w_avx2_n)((const uint16_t *)w + row * K, K, xs, out, nt);
        return;
    case MODE_DENSE: {
        const int64_t size = m->bits == 8 ? 1 : m->wdtype == DT_F32 ? 4 : 2;
        const void *r = (const char *)w + row * K * size;
        (wide ? dense_avx512_n : dense_avx2_n)(m->bits, m->wdtype, r, K, xs, out, nt);
        if (m->bits == 8)
            for (int t = 0; t < nt; t++) out[t] *= scale[row];
        return;
    }
    default: break;
    }
#endif
    rows_scalar(m, w, scale, row, xs, nt, out);
}

/* out[r * nt + t] = W[row + r] . xs[t] for r < 4: one token against four rows where a
 * vector path shares its activation loads between them, else row by row. Measured on a
 * 2-core Zen 5 (NF4, rows of K values): one row at a time streams 40-42 GB/s at K = 2048
 * and 4096 but 18 at K = 14336, whose float32 activations (56 KB) spill out of L1; four
 * rows sharing each activation load stream 27-30 GB/s at every K. */
#define ROWS4_MIN_K 8192
static void dot_rows4(const matrix_t *m, const void *w, const float *scale, int64_t row,
                      const void *const *xv, int nt, float *out) {
    const float *const *xs = (const float *const *)xv;
#ifdef MOERUN_X86
    const int64_t K = m->cols;
    /* Only for long rows: a short row's activations stay in L1 anyway, and one row at a
       time streams better (one sequential read per row instead of four interleaved). */
    /* AVX2, bf16 (a decode step's matrices at rest): four rows at a time streamed 25-28 GB/s
       against 21-25 one row at a time on 2 Zen 3 cores, at every K measured (2048-4096). */
    if (nt == 1 && m->V == 8 && m->mode == MODE_BF16_WORDS) {
        bf16w_avx2_rows4((const uint16_t *)w + row * K, K, xs[0], out);
        return;
    }
    if (nt == 1 && m->V == 16 && K >= ROWS4_MIN_K) {
        switch (m->mode) {
        case MODE_NF4_WORDS:
            nf4w_avx512_rows4((const uint8_t *)w + row * (K / 2), scale + row * (K / 64), K, xs[0], out);
            return;
        case MODE_I8_WORDS:
            i8w_avx512_rows4((const int8_t *)w + row * K, K, xs[0], out);
            for (int r = 0; r < 4; r++) out[r] *= scale[row + r];
            return;
        case MODE_BF16_WORDS:
            bf16w_avx512_rows4((const uint16_t *)w + row * K, K, xs[0], out);
            return;
        default: break;
        }
    }
#endif
    for (int r = 0; r < 4; r++) dot_row(m, w, scale, row + r, xv, nt, out + r * nt);
}

/* ---- one MoE layer ------------------------------------------------------------------ */

typedef struct {
    int isa;
    matrix_t m13, m2;     /* w13 [2I, D], w2 [D, I] */
    int bias_dtype;
    int64_t D, I;
    int act;
    float alpha, limit;
    int weights_on_input;
    const int64_t *table; /* [E, T_COLS] addresses */
    int n_groups;
    const int *group_expert;  /* [G] */
    const int64_t *group_off; /* [G + 1] into the pair arrays */
    const int64_t *pair_tok;  /* [P] token of each pair, grouped by expert */
    const float *pair_w;      /* [P] its routing weight */
    const char *xp;           /* [N, D] x in m13's order and element type (float32 or bf16) */
    char *act_buf;            /* [P, I] activations, in m2's order and element type */
    int64_t x_size, act_size; /* bytes per element of each */
    float *out;               /* [N, D] float32, accumulated */
} layer_t;

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static inline float activate(const layer_t *L, float gate, float up) {
    if (L->act == ACT_SILU) return silu(gate) * up;
    gate = gate < L->limit ? gate : L->limit;
    up = up < -L->limit ? -L->limit : (up > L->limit ? L->limit : up);
    return gate / (1.0f + expf(-gate * L->alpha)) * (up + 1.0f);
}

#define CHUNK 16 /* rows decoded per pass over the token tiles: they stay in L1 between tiles */

/* Phase 1: flat rows [r0, r1) of the (expert, gate row) space; for each row j of an
 * expert both gate row j and up row I + j, for every token of the expert. */
static void phase1(const layer_t *L, int64_t r0, int64_t r1) {
    const int64_t I = L->I;
    const void *xs[MAXT];
    float gate[4 * MAXT], up[4 * MAXT];
    for (int64_t r = r0; r < r1;) {
        const int g = (int)(r / I);
        const int64_t j_end = (int64_t)(g + 1) * I < r1 ? (int64_t)(g + 1) * I : r1;
        const int64_t *T = L->table + (int64_t)L->group_expert[g] * T_COLS;
        const void *w13 = (const void *)T[T_W13];
        const float *s13 = (const float *)T[T_W13S];
        const void *b13 = (const void *)T[T_B13];
        const int64_t p0 = L->group_off[g], n = L->group_off[g + 1] - p0;
        for (int64_t c0 = r - (int64_t)g * I; c0 < j_end - (int64_t)g * I; c0 += CHUNK) {
            const int64_t c1 = c0 + CHUNK < j_end - (int64_t)g * I ? c0 + CHUNK : j_end - (int64_t)g * I;
            for (int64_t t0 = 0; t0 < n; t0 += MAXT) {
                const int nt = (int)(n - t0 < MAXT ? n - t0 : MAXT);
                for (int t = 0; t < nt; t++) xs[t] = L->xp + L->pair_tok[p0 + t0 + t] * L->D * L->x_size;
                for (int64_t j0 = c0; j0 < c1; j0 += 4) {
                    const int rows = c1 - j0 < 4 ? (int)(c1 - j0) : 4;
                    if (rows == 4) {
                        dot_rows4(&L->m13, w13, s13, j0, xs, nt, gate);
                        dot_rows4(&L->m13, w13, s13, I + j0, xs, nt, up);
                    } else {
                        for (int r = 0; r < rows; r++) {
                            dot_row(&L->m13, w13, s13, j0 + r, xs, nt, gate + r * nt);
                            dot_row(&L->m13, w13, s13, I + j0 + r, xs, nt, up + r * nt);
                        }
                    }
                    for (int r = 0; r < rows; r++) {
                        const int64_t j = j0 + r, pos = layout_pos(&L->m2, j);
                        const float bg = b13 ? load_scalar(b13, j, L->bias_dtype) : 0.0f;
                        const float bu = b13 ? load_scalar(b13, I + j, L->bias_dtype) : 0.0f;
                        for (int t = 0; t < nt; t++) {
                            /* weights on the input: (w x) W = w (x W), the bias unscaled */
                            const float scale = L->weights_on_input ? L->pair_w[p0 + t0 + t] : 1.0f;
                            put_act(&L->m2, L->act_buf + (p0 + t0 + t) * I * L->act_size, pos,
                                    activate(L, scale * gate[r * nt + t] + bg, scale * up[r * nt + t] + bu));
                        }
                    }
                }
            }
        }
        r = j_end;
    }
}

/* Phase 2: rows [d0, d1) of down for every expert, summed into out. Threads own
 * disjoint output columns, so no two write the same float. */
static void phase2(const layer_t *L, int64_t d0, int64_t d1) {
    const void *xs[MAXT];
    float y[4 * MAXT];
    for (int g = 0; g < L->n_groups; g++) {
        const int64_t *T = L->table + (int64_t)L->group_expert[g] * T_COLS;
        const void *w2 = (const void *)T[T_W2];
        const float *s2 = (const float *)T[T_W2S];
        const void *b2 = (const void *)T[T_B2];
        const int64_t p0 = L->group_off[g], n = L->group_off[g + 1] - p0;
        for (int64_t c0 = d0; c0 < d1; c0 += CHUNK) {
            const int64_t c1 = c0 + CHUNK < d1 ? c0 + CHUNK : d1;
            for (int64_t t0 = 0; t0 < n; t0 += MAXT) {
                const int nt = (int)(n - t0 < MAXT ? n - t0 : MAXT);
                for (int t = 0; t < nt; t++) xs[t] = L->act_buf + (p0 + t0 + t) * L->I * L->act_size;
                for (int64_t d0 = c0; d0 < c1; d0 += 4) {
                    const int rows = c1 - d0 < 4 ? (int)(c1 - d0) : 4;
                    if (rows == 4)
                        dot_rows4(&L->m2, w2, s2, d0, xs, nt, y);
                    else
                        for (int r = 0; r < rows; r++) dot_row(&L->m2, w2, s2, d0 + r, xs, nt, y + r * nt);
                    for (int r = 0; r < rows; r++) {
                        const int64_t d = d0 + r;
                        const float bd = b2 ? load_scalar(b2, d, L->bias_dtype) : 0.0f;
                        for (int t = 0; t < nt; t++) {
                            const int64_t p = p0 + t0 + t;
                            const float scale = L->weights_on_input ? 1.0f : L->pair_w[p];
                            L->out[L->pair_tok[p] * L->D + d] += scale * (y[r * nt + t] + bd);
                        }
                    }
                }
            }
        }
    }
}

/* Split [0, rows) into `parts` contiguous ranges of about equal cost, where row r of
 * expert g = r / rows_per costs (2 + tokens of g): a contiguous range per thread keeps
 * each thread's reads sequential, which the hardware prefetchers need. */
static int64_t split_point(const layer_t *L, int64_t rows_per, int part, int parts) {
    if (part <= 0) return 0;
    const int64_t total_rows = (int64_t)L->n_groups * rows_per;
    if (part >= parts) return total_rows;
    double total = 0.0;
    for (int g = 0; g < L->n_groups; g++) total += (double)rows_per * (2 + L->group_off[g + 1] - L->group_off[g]);
    double target = total * part / parts, acc = 0.0;
    for (int g = 0; g < L->n_groups; g++) {
        const double per_row = 2.0 + (double)(L->group_off[g + 1] - L->group_off[g]);
        if (acc + per_row * rows_per >= target) {
            int64_t r = (int64_t)((target - acc) / per_row);
            r = (r + 3) / 4 * 4; /* whole groups of rows */
            return (int64_t)g * rows_per + (r < rows_per ? r : rows_per);
        }
        acc += per_row * rows_per;
    }
    return total_rows;
}

static int pick_isa(void) {
#ifdef MOERUN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

static int current_isa(void) {
    if (g_bf16dp < 0) {
#ifdef MOERUN_X86
        g_bf16dp = pick_isa() == ISA_AVX512 && __builtin_cpu_supports("avx512bf16");
#else
        g_bf16dp = 0;
#endif
    }
    if (g_isa < 0) g_isa = pick_isa();
    return g_isa;
}

/* Threads worth waking for a call whose work is about `bytes` (weights or cache read, times
 * the tokens each is applied to): one per BYTES_PER_THREAD, at least one, at most the
 * n_threads asked (else OpenMP's maximum). A small call on one thread skips the fork/join
 * (microseconds when the team spins) and, on a busy machine, the wait at a barrier for a
 * thread the OS has set aside (milliseconds): the demo decoded 3x slower beside one busy
 * loop. Which thread computes a row never changes its value, so the count changes no result. */
#define BYTES_PER_THREAD ((int64_t)256 << 10)

static int threads_for(int64_t bytes, int n_threads) {
#ifdef _OPENMP
    const int asked = n_threads > 0 ? n_threads : omp_get_max_threads();
#else
    const int asked = 1;
    (void)n_threads;
#endif
    const int64_t useful = 1 + bytes / BYTES_PER_THREAD;
    return useful < asked ? (int)useful : asked;
}

/* Scratch kept between calls (one layer at a time: calls are serialised by the GIL
 * holder; the buffers only grow). */
static void *g_scratch = NULL;
static size_t g_scratch_bytes = 0;

static void *scratch(size_t bytes) {
    if (bytes > g_scratch_bytes) {
        free(g_scratch);
        g_scratch = malloc(bytes);
        g_scratch_bytes = g_scratch ? bytes : 0;
    }
    return g_scratch;
}

/* The whole layer: returns the number of experts computed, or -1 (bad expert id), -2
 * (out of memory). */
static int64_t moe_layer(int64_t x_addr, int x_dtype, int64_t N, int64_t D, int64_t I,
                         int64_t ids_addr, int64_t wts_addr, int64_t Kk, int64_t table_addr, int64_t E,
                         int bits, int wdtype, int act, float alpha, float limit, int weights_on_input,
                         int64_t out_addr, int n_threads) {
    layer_t L;
    memset(&L, 0, sizeof L);
    L.isa = current_isa();
    L.D = D;
    L.I = I;
    L.act = act;
    L.alpha = alpha;
    L.limit = limit;
    L.weights_on_input = weights_on_input;
    L.bias_dtype = wdtype;
    L.table = (const int64_t *)table_addr;
    /* bf16 dot products for a bf16 model's prompts and 16-bit weights; a one-token step
       with quantized weights stays in float32 (as fast there, and exact) */
    const int bf16_x = x_dtype == DT_BF16 && (N > 1 || bits == 16);
    L.m13 = make_matrix(L.isa, bits, wdtype, D, bf16_x);
    L.m2 = make_matrix(L.isa, bits, wdtype, I, bf16_x);
    L.x_size = is_dp(&L.m13) ? 2 : 4;
    L.act_size = is_dp(&L.m2) ? 2 : 4;
    const int64_t *ids = (const int64_t *)ids_addr;
    const float *wts = (const float *)wts_addr;
    const int64_t P_max = N * Kk;

    /* Group the pairs by expert (counting sort, stable in token order). */
    size_t need = sizeof(int64_t) * (E + 1)             /* counts / offsets */
                  + sizeof(int) * E + sizeof(int64_t) * (E + 1) /* group arrays */
                  + sizeof(int64_t) * P_max + sizeof(float) * P_max
                  + sizeof(float) * (N * D) + sizeof(float) * (P_max * I) + 64 * 8;
    char *mem = (char *)scratch(need);
    if (!mem) return -2;
#define CARVE(ptr, type, count) do { ptr = (type *)mem; mem += ((sizeof(type) * (count) + 63) / 64) * 64; } while (0)
    int64_t *count, *goff, *ptok;
    int *gexp;
    float *pw;
    char *xp, *abuf;
    CARVE(count, int64_t, E + 1);
    CARVE(gexp, int, E);
    CARVE(goff, int64_t, E + 1);
    CARVE(ptok, int64_t, P_max);
    CARVE(pw, float, P_max);
    CARVE(xp, char, 4 * N * D); /* float32 or bf16 */
    CARVE(abuf, char, 4 * P_max * I);
#undef CARVE
    memset(count, 0, sizeof(int64_t) * (E + 1));
    for (int64_t p = 0; p < P_max; p++) {
        const int64_t e = ids[p];
        if (e < 0 || e >= E) return -1;
        if (L.table[e * T_COLS + T_W13]) count[e]++;
    }
    int G = 0;
    int64_t total = 0;
    for (int64_t e = 0; e < E; e++) {
        if (!count[e]) continue;
        gexp[G] = (int)e;
        goff[G] = total;
        total += count[e];
        count[e] = goff[G]; /* now: the next free position of expert e */
        G++;
    }
    goff[G] = total;
    for (int64_t p = 0; p < P_max; p++) {
        const int64_t e = ids[p];
        if (!L.table[e * T_COLS + T_W13]) continue;
        const int64_t at = count[e]++;
        ptok[at] = p / Kk;
        pw[at] = wts[p];
    }
    if (!G) return 0;

    /* x as float32, in the order w13's rows are read in. */
    for (int64_t t = 0; t < N; t++)
        for (int64_t k = 0; k < D; k++)
            put_act(&L.m13, xp + t * D * L.x_size, layout_pos(&L.m13, k), load_scalar((const void *)x_addr, t * D + k, x_dtype));

    L.n_groups = G;
    L.group_expert = gexp;
    L.group_off = goff;
    L.pair_tok = ptok;
    L.pair_w = pw;
    L.xp = xp;
    L.act_buf = abuf;
    L.out = (float *)out_addr;

#ifdef _OPENMP
    /* the weights read, each applied to its expert's tokens (total pairs over G experts) */
    const int64_t wbits = bits == 16 ? (wdtype == DT_F32 ? 32 : 16) : bits;
    const int threads = threads_for((int64_t)G * 3 * I * D * wbits / 8 * (total / G), n_threads);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        phase1(&L, split_point(&L, I, t, nt), split_point(&L, I, t + 1, nt));
#pragma omp barrier
        /* every activation is written: the down rows, split evenly (each costs the same) */
        phase2(&L, D * t / nt, D * (t + 1) / nt);
    }
#else
    phase1(&L, 0, (int64_t)G * I);
    phase2(&L, 0, D);
#endif
    return G;
}

/* ---- dense layers at a few tokens -------------------------------------------------- *
 * out_i [M, N_i] float32 = x [M, K] . W_i [N_i, K]^T (+ b_i [N_i]) for one or more matrices
 * that read the same input (q/k/v, gate/up), with 16-bit or float32 weights of one dtype:
 * the non-expert linears of a decode step (attention projections, routers, lm_head), where
 * a GEMV is bound by reading W once. The rows of all the matrices, one after the other,
 * are split into one contiguous range per thread: one parallel region (one barrier) for
 * all of them. mats: n_mats rows of LIN_COLS int64s (the columns below). */
enum { LIN_W, LIN_N, LIN_B, LIN_OUT, LIN_COLS };

static int64_t dense_linears(int64_t x_addr, int x_dtype, int64_t M, int64_t K, int w_dtype, const int64_t *mats,
                             int n_mats, int n_threads) {
    const matrix_t m = make_matrix(current_isa(), 16, w_dtype, K, x_dtype == DT_BF16);
    const int64_t x_size = is_dp(&m) ? 2 : 4;
    char *xp = (char *)scratch(sizeof(float) * (size_t)(M * K) + 64);
    if (!xp) return -2;
    for (int64_t t = 0; t < M; t++)
        for (int64_t k = 0; k < K; k++)
            put_act(&m, xp + t * K * x_size, layout_pos(&m, k), load_scalar((const void *)x_addr, t * K + k, x_dtype));
    int64_t total = 0; /* rows of all the matrices, numbered one after the other */
    for (int i = 0; i < n_mats; i++) total += mats[i * LIN_COLS + LIN_N];
#ifdef _OPENMP
    const int threads = threads_for(total * K * (w_dtype == DT_F32 ? 4 : 2) * M, n_threads); /* W, once per token */
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt_threads = omp_get_num_threads();
#else
        const int t = 0, nt_threads = 1;
#endif
        const int64_t g0 = total * t / nt_threads, g1 = total * (t + 1) / nt_threads;
        const void *xs[MAXT];
        float y[4 * MAXT];
        int64_t first = 0; /* the global number of matrix i's row 0 */
        for (int i = 0; i < n_mats; first += mats[i * LIN_COLS + LIN_N], i++) {
            const int64_t N = mats[i * LIN_COLS + LIN_N];
            const int64_t r0 = g0 > first ? g0 - first : 0, r1 = g1 - first < N ? g1 - first : N;
            if (r0 >= r1) continue;
            const void *w = (const void *)mats[i * LIN_COLS + LIN_W], *b = (const void *)mats[i * LIN_COLS + LIN_B];
            float *out = (float *)mats[i * LIN_COLS + LIN_OUT];
            for (int64_t t0 = 0; t0 < M; t0 += MAXT) {
                const int nt = (int)(M - t0 < MAXT ? M - t0 : MAXT);
                for (int j = 0; j < nt; j++) xs[j] = xp + (t0 + j) * K * x_size;
                for (int64_t r = r0; r < r1; r += 4) {
                    const int rows = r1 - r < 4 ? (int)(r1 - r) : 4;
                    if (rows == 4)
                        dot_rows4(&m, w, NULL, r, xs, nt, y);
                    else
                        for (int j = 0; j < rows; j++) dot_row(&m, w, NULL, r + j, xs, nt, y + j * nt);
                    for (int j = 0; j < rows; j++) {
                        const float bias = b ? load_scalar(b, r + j, w_dtype) : 0.0f;
                        for (int u = 0; u < nt; u++) out[(t0 + u) * N + r + j] = y[j * nt + u] + bias;
                    }
                }
            }
        }
    }
    return total;
}

/* ---- dequantized tiles for prompts ---------------------------------------------------- *
 * With many tokens per expert (a long prompt: Qwen3-30B-A3B pp512 routes ~32 tokens to
 * each expert, Mixtral ~128) the register-decoding kernels above decode every weight again
 * for each MAXT tokens and keep few FMAs in flight; a GEMM on a dequantized copy is faster
 * there. dequant_rows writes rows [r0, r1) of one stored matrix, in natural column order,
 * into a float32 buffer: cpu_experts.py dequantizes one cache-sized tile at a time and
 * multiplies it with torch's GEMM. Values are level x absmax, int8 x scale, or the 16-bit
 * value widened: the exact float32 numbers the formats' unpack gives. */

/* Flat elements [f0, f1) of a row-major matrix of rows of K values (NF4: blocks of 64
 * flat values, a block may straddle rows). */
static void dequant_scalar(int bits, int wdtype, const void *w, const float *scale, int64_t K, int64_t f0,
                           int64_t f1, float *out) {
    for (int64_t f = f0; f < f1; f++) {
        if (bits == 4) {
            const uint8_t byte = ((const uint8_t *)w)[f >> 1];
            out[f - f0] = NF4[(f & 1) ? (byte & 15) : (byte >> 4)] * scale[f >> 6];
        } else if (bits == 8) {
            out[f - f0] = (float)((const int8_t *)w)[f] * scale[f / K];
        } else {
            out[f - f0] = load_scalar(w, f, wdtype);
        }
    }
}

#ifdef MOERUN_X86
/* 8 NF4 levels for the 8 codes in the low nibbles of idx (permutevar8x32 reads the low 3
 * bits; bit 3, shifted into the sign, picks the table half). */
AVX2 INLINE __m256 nf4_levels_avx2(__m256i idx, __m256 lo, __m256 hi) {
    const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), pick);
}

/* AVX2 is used on AVX-512 CPUs too: this is a stream of a few instructions per value,
 * against the GEMM's several multiply-adds per value, so wider vectors would gain little. */
AVX2 static void dequant_avx2(int bits, int wdtype, const void *w, const float *scale, int64_t K, int64_t f0,
                              int64_t f1, float *out) {
    if (bits == 4) {
        const __m256 lo = _mm256_loadu_ps(NF4), hi = _mm256_loadu_ps(NF4 + 8);
        int64_t f = (f0 + 63) / 64 * 64 < f1 ? (f0 + 63) / 64 * 64 : f1;
        dequant_scalar(bits, wdtype, w, scale, K, f0, f, out); /* up to the first whole block */
        for (; f + 64 <= f1; f += 64) {
            const uint8_t *q = (const uint8_t *)w + f / 2;
            const __m256 s = _mm256_set1_ps(scale[f / 64]);
            for (int h = 0; h < 4; h++) { /* 8 bytes -> 16 values */
                const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * h)));
                const __m256 even = _mm256_mul_ps(nf4_levels_avx2(_mm256_srli_epi32(c, 4), lo, hi), s);
                const __m256 odd = _mm256_mul_ps(nf4_levels_avx2(c, lo, hi), s);
                /* interleave: unpack within 128-bit halves, then put the halves in order */
                const __m256 a = _mm256_unpacklo_ps(even, odd), b = _mm256_unpackhi_ps(even, odd);
                _mm256_storeu_ps(out + f - f0 + 16 * h, _mm256_permute2f128_ps(a, b, 0x20));
                _mm256_storeu_ps(out + f - f0 + 16 * h + 8, _mm256_permute2f128_ps(a, b, 0x31));
            }
        }
        dequant_scalar(bits, wdtype, w, scale, K, f, f1, out + f - f0);
    } else if (bits == 8) { /* f0 and f1 are row starts: one scale per row */
        for (int64_t row = f0 / K; row < f1 / K; row++) {
            const int8_t *q = (const int8_t *)w + row * K;
            float *o = out + row * K - f0;
            const __m256 s = _mm256_set1_ps(scale[row]);
            int64_t k = 0;
            for (; k + 8 <= K; k += 8)
                _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)))), s));
            for (; k < K; k++) o[k] = (float)q[k] * scale[row];
        }
    } else {
        int64_t f = f0;
        for (; f + 8 <= f1; f += 8) _mm256_storeu_ps(out + f - f0, load8_avx2(16, wdtype, w, f));
        dequant_scalar(bits, wdtype, w, scale, K, f, f1, out + f - f0);
    }
}
#endif

/* Rows [r0, r1) of a matrix of rows of K values (w: the stored values, scale: NF4 absmax
 * or int8 row scales) -> out float32 [r1 - r0, K]. One parallel region for the whole tile,
 * its rows split into one contiguous range per thread, sized by threads_for. */
static int64_t dequant_rows(int64_t w_addr, int64_t scale_addr, int bits, int wdtype, int64_t K, int64_t r0,
                            int64_t r1, int64_t out_addr, int n_threads) {
    const int isa = current_isa();
    const void *w = (const void *)w_addr;
    const float *scale = (const float *)scale_addr;
    float *out = (float *)out_addr;
#ifdef _OPENMP
    const int threads = threads_for((r1 - r0) * K * 4, n_threads); /* the float32 tile written */
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        const int64_t a = r0 + (r1 - r0) * t / nt, b = r0 + (r1 - r0) * (t + 1) / nt;
        float *o = out + (a - r0) * K;
#ifdef MOERUN_X86
        if (isa != ISA_SCALAR)
            dequant_avx2(bits, wdtype, w, scale, K, a * K, b * K, o);
        else
#endif
            dequant_scalar(bits, wdtype, w, scale, K, a * K, b * K, o);
    }
    (void)isa;
    return r1 - r0;
}

/* ---- attention for a few queries ---------------------------------------------------- *
 * out [B, H, T, Dv] float32 = softmax(scale q k^T (+ mask)) v for a decode step, where the
 * generic matmul + softmax path pays ~30 us per op for a few thousand multiply-adds.
 * q [B, H, T, Dh], k [B, Hk, S, Dh], v [B, Hk, S, Dv] in float32/bf16/fp16 with any
 * strides (a prefix of the KV cache), query head h reading kv head h / (H / Hk); mask
 * uint8 [T, S] (1: attend) or none. One task per (b, h, t); scores in float32. */

#ifdef MOERUN_X86
/* exp for 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], Cephes' expf polynomial
 * (about 1 ulp); below -87 it underflows to 0, as expf does. */
AVX512 static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.7f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_scalef_ps(p, n));
}

/* 16 elements of a vector of `dtype` as float32 (masked at the end). */
AVX512 static inline __m512 load16_any(const void *p, int64_t i, int dtype, __mmask16 m) {
    switch (dtype) {
    case DT_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    case DT_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    default: return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    }
}

AVX512 static void attend_one_avx512(const float *q, const char *k, int64_t ks, const char *v, int64_t vs, int dtype,
                                     int64_t esize, int64_t S, int64_t Dh, int64_t Dv, const uint8_t *mask, float scale,
                                     float *scores, float *out) {
    float m = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            scores[s] = -INFINITY;
            continue;
        }
        const char *row = k + s * ks * esize;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dh; d += 16) {
            const __mmask16 mk = Dh - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Dh - d)) - 1);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + d), load16_any(row, d, dtype, mk), acc);
        }
        scores[s] = scale * _mm512_reduce_add_ps(acc);
        m = scores[s] > m ? scores[s] : m;
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m == -INFINITY ? 0.0f : m);
    for (int64_t s = 0; s < S; s += 16) {
        const __mmask16 mk = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, scores + s), mv)));
        _mm512_mask_storeu_ps(scores + s, mk, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t d0 = 0; d0 < Dv; d0 += 128) { /* each value row read once per 128 columns */
        const int64_t width = Dv - d0 < 128 ? Dv - d0 : 128, parts = (width + 15) / 16;
        __m512 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; s++) {
            if (scores[s] == 0.0f) continue; /* masked */
            const __m512 p = _mm512_set1_ps(scores[s]);
            const char *row = v + s * vs * esize;
            for (int64_t j = 0; j < parts; j++) {
                const int64_t left = width - 16 * j;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
                acc[j] = _mm512_fmadd_ps(p, load16_any(row, d0 + 16 * j, dtype, mk), acc[j]);
            }
        }
        for (int64_t j = 0; j < parts; j++) {
            const int64_t left = width - 16 * j;
            const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            _mm512_mask_storeu_ps(out + d0 + 16 * j, mk, _mm512_mul_ps(acc[j], inv));
        }
    }
}
#endif

static void attend_one_scalar(const float *q, const char *k, int64_t ks, const char *v, int64_t vs, int dtype,
                              int64_t esize, int64_t S, int64_t Dh, int64_t Dv, const uint8_t *mask, float scale,
                              float *scores, float *out) {
    float m = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            scores[s] = -INFINITY;
            continue;
        }
        float acc = 0.0f;
        for (int64_t d = 0; d < Dh; d++) acc += q[d] * load_scalar(k + s * ks * esize, d, dtype);
        scores[s] = scale * acc;
        m = scores[s] > m ? scores[s] : m;
    }
    float sum = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        scores[s] = scores[s] == -INFINITY ? 0.0f : expf(scores[s] - m);
        sum += scores[s];
    }
    for (int64_t d = 0; d < Dv; d++) out[d] = 0.0f;
    for (int64_t s = 0; s < S; s++)
        for (int64_t d = 0; d < Dv; d++) out[d] += scores[s] * load_scalar(v + s * vs * esize, d, dtype);
    for (int64_t d = 0; d < Dv; d++) out[d] /= sum;
}

/* strides in elements: q (b, h, t, d), k and v (b, h, s, d); the last one must be 1. */
static int64_t attention(int64_t q_addr, int64_t k_addr, int64_t v_addr, int dtype, int64_t B, int64_t H,
                         int64_t Hk, int64_t T, int64_t S, int64_t Dh, int64_t Dv, const int64_t *qst,
                         const int64_t *kst, const int64_t *vst, int64_t mask_addr, float scale, int64_t out_addr,
                         int n_threads) {
    const int isa = current_isa();
    const int64_t esize = dtype == DT_F32 ? 4 : 2, G = H / Hk, tasks = B * H * T;
    const int threads = threads_for(B * Hk * S * (Dh + Dv) * esize * T, n_threads);  /* the cache, per query */
    float *buf = (float *)scratch(sizeof(float) * (size_t)threads * (size_t)(S + Dh + 16));
    if (!buf) return -2;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        const int me = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int me = 0, nt = 1;
#endif
        float *scores = buf + (int64_t)me * (S + Dh + 16), *qf = scores + S;
        for (int64_t task = tasks * me / nt; task < tasks * (me + 1) / nt; task++) {
            const int64_t b = task / (H * T), h = (task / T) % H, t = task % T, hk = h / G;
            const char *qp = (const char *)q_addr + (b * qst[0] + h * qst[1] + t * qst[2]) * esize;
            for (int64_t d = 0; d < Dh; d++) qf[d] = load_scalar(qp, d, dtype);
            const char *kp = (const char *)k_addr + (b * kst[0] + hk * kst[1]) * esize;
            const char *vp = (const char *)v_addr + (b * vst[0] + hk * vst[1]) * esize;
            const uint8_t *mask = mask_addr ? (const uint8_t *)mask_addr + t * S : NULL;
            float *o = (float *)out_addr + ((b * H + h) * T + t) * Dv;
#ifdef MOERUN_X86
            if (isa == ISA_AVX512) {
                attend_one_avx512(qf, kp, kst[2], vp, vst[2], dtype, esize, S, Dh, Dv, mask, scale, scores, o);
                continue;
            }
#endif
            attend_one_scalar(qf, kp, kst[2], vp, vst[2], dtype, esize, S, Dh, Dv, mask, scale, scores, o);
        }
    }
    (void)isa;
    return tasks;
}

/* ---- decode-step glue: RMSNorm, RoPE, routing (moerun/kernels/cpu_glue.py) -------------- *
 * The small ops between a decode step's weight reads, one call each instead of 5-15 torch
 * ops, computing what torch computes bit for bit: every product, sum and cast rounded where
 * the torch code rounds it (plain C, no FMA contraction), and torch's own summation orders
 * for the reductions whose order shows in the result. Single-threaded: each is microseconds
 * of work, and no OpenMP region means no thread spinning on a busy machine. Activations and
 * weights are float32 or bf16. */

/* f rounded to bf16 as f32_to_bf16 rounds it (nearest even, NaN kept a NaN), as float32
 * bits; branch-free, so that the loops around it vectorise. */
static inline uint32_t bf16_round_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u, nan = (u | 0x00400000u) & 0xffff0000u;
    return (u & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}

static inline float round_bf16(float f) {
    const uint32_t u = bf16_round_bits(f);
    float r;
    memcpy(&r, &u, 4);
    return r;
}

static inline void store_as(void *p, int64_t i, int dtype, float v) {
    if (dtype == DT_BF16)
        ((uint16_t *)p)[i] = (uint16_t)(bf16_round_bits(v) >> 16);
    else
        ((float *)p)[i] = v;
}

/* torch's utils::CeilLog2 (ATen/native/cpu/utils.h): 1 up to 2, then ceil(log2(x)). */
static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t bits = 0;
    for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* torch's row_sum (SumKernel.cpp) over `count` items of `width` lanes each (item i: x[i*width ..]):
 * four interleaved chains (ilp), each a cascade of four levels of >= 16 items, so that only
 * sums of similar size meet. out: the width lane sums. */
static inline __attribute__((always_inline)) void cascade_row_sum(const float *x, int64_t count, int width,
                                                                   float *out) {
    enum { LEVELS = 4, ILP = 4, MAX_W = 16 };
    float acc[LEVELS][ILP][MAX_W] = {{{0}}};
    const int64_t size = count / ILP, power = ceil_log2(size) / LEVELS > 4 ? ceil_log2(size) / LEVELS : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < width; l++) acc[0][k][l] += x[(i * ILP + k) * width + l];
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < width; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < width; l++) acc[0][k][l] += x[(i * ILP + k) * width + l];
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < width; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t r = size * ILP; r < count; r++)
        for (int l = 0; l < width; l++) acc[0][0][l] += x[r * width + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < width; l++) acc[0][0][l] += acc[0][k][l];
    for (int l = 0; l < width; l++) out[l] = acc[0][0][l];
}

/* torch's sum of n contiguous floats (cascade_sum's inner reduction) with its vectors of
 * `lanes` floats: whole vectors summed lane-wise, then the tail, then the lanes in order;
 * fewer than `lanes` values take the scalar path. The result lands on a zero-filled output. */
static float torch_sum(const float *x, int64_t n, int lanes) {
    float total = 0.0f;
    if (n >= lanes) {
        float lane_sums[16];
        const int64_t vectors = n / lanes;
        if (lanes == 8) /* constant widths: loops the compiler vectorises */
            cascade_row_sum(x, vectors, 8, lane_sums);
        else if (lanes == 16)
            cascade_row_sum(x, vectors, 16, lane_sums);
        else
            cascade_row_sum(x, vectors, lanes, lane_sums);
        for (int64_t k = vectors * lanes; k < n; k++) total += x[k];
        for (int l = 0; l < lanes; l++) total += lane_sums[l];
    } else {
        cascade_row_sum(x, n, 1, &total);
    }
    return 0.0f + total;
}

/* torch's vec::reduce_all with `lanes`-float vectors (functional_base.h): lane-wise over
 * whole vectors, the tail into the first lanes, then a butterfly (lane l with l ^ L/2, then
 * l ^ L/4, ... ); under `lanes` values, in order. op: 0 sum, 1 max. */
static float torch_reduce_all(const float *x, int64_t n, int lanes, int op) {
#define REDUCE(a, b) (op ? ((a) > (b) || (a) != (a) ? (a) : (b)) : (a) + (b))
    float acc[16];
    if (n < lanes) {
        float r = x[0];
        for (int64_t i = 1; i < n; i++) r = REDUCE(r, x[i]);
        return r;
    }
    for (int l = 0; l < lanes; l++) acc[l] = x[l];
    int64_t d = lanes;
    for (; d < n - n % lanes; d += lanes)
        for (int l = 0; l < lanes; l++) acc[l] = REDUCE(acc[l], x[d + l]);
    for (int l = 0; d + l < n; l++) acc[l] = REDUCE(acc[l], x[d + l]);
    for (int s = lanes / 2; s >= 1; s /= 2) {
        float next[16];
        for (int l = 0; l < lanes; l++) next[l] = REDUCE(acc[l], acc[l ^ s]);
        memcpy(acc, next, sizeof(float) * (size_t)lanes);
    }
    return acc[0];
#undef REDUCE
}

/* SLEEF's expf_u10 (torch's Vectorized<float>::exp), built with FMA as torch's AVX2 and
 * AVX-512 builds are: a degree-6 polynomial on the reduced argument, then times 2^q. */
static float sleef_expf(float d) {
    if (d != d) return d;
    if (d < -104.0f) return 0.0f;
    if (d > 100.0f) return INFINITY;
    const int32_t q = (int32_t)rintf(d * 1.442695040888963407359924681001892137f);
    float s = fmaf((float)q, -0.693145751953125f, d);
    s = fmaf((float)q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    const int32_t half = q >> 1; /* ldexp in two steps, as SLEEF's vldexp2 */
    uint32_t b1 = (uint32_t)(half + 127) << 23, b2 = (uint32_t)(q - half + 127) << 23;
    float p1, p2;
    memcpy(&p1, &b1, 4);
    memcpy(&p2, &b2, 4);
    return u * p1 * p2;
}

/* x [rows, D] (row stride in elements) -> out [rows, D] contiguous, as layers.RMSNorm:
 * r = 1 / sqrt(sum(x^2) / D + eps) in float32, the sum in torch's order (`lanes`), then by
 * `mode`: 0 cast x*r to x's dtype, then times w in the output dtype (the promotion of x's
 * and w's); 1 w * (x*r) in float32, then the cast (gpt-oss, Nemotron-H); 2 (x*r) * (1 + w) in
 * float32, then the cast (Qwen3-Next's zero-centred weights). */
static void load_row(const void *x, int dtype, int64_t n, float *out) {
    if (dtype == DT_BF16)
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    else
        memcpy(out, x, sizeof(float) * (size_t)n);
}

static void store_row(const float *v, int64_t n, int dtype, void *out) {
    if (dtype == DT_BF16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)out)[i] = (uint16_t)(bf16_round_bits(v[i]) >> 16);
    else
        memcpy(out, v, sizeof(float) * (size_t)n);
}

static int64_t rms_norm(int64_t x_addr, int x_dtype, int64_t rows, int64_t D, int64_t x_stride, int64_t w_addr,
                        int w_dtype, int mode, float eps, int64_t out_addr, int out_dtype, int lanes) {
    float *buf = (float *)malloc(sizeof(float) * (size_t)(3 * D));
    if (!buf) return -2;
    float *x32 = buf, *y = buf + D, *w = buf + 2 * D;
    load_row((const void *)w_addr, w_dtype, D, w);
    if (mode == 2)
        for (int64_t d = 0; d < D; d++) w[d] = 1.0f + w[d];
    for (int64_t r = 0; r < rows; r++) {
        load_row((const char *)x_addr + r * x_stride * (x_dtype == DT_F32 ? 4 : 2), x_dtype, D, x32);
        for (int64_t d = 0; d < D; d++) y[d] = x32[d] * x32[d];
        const float inv = 1.0f / sqrtf(torch_sum(y, D, lanes) / (float)D + eps);
        for (int64_t d = 0; d < D; d++) y[d] = x32[d] * inv;
        if (mode == 0 && x_dtype == DT_BF16)
            for (int64_t d = 0; d < D; d++) y[d] = round_bf16(y[d]) * w[d];
        else /* the weight's product in float32 (a float32 x's cast back changes nothing) */
            for (int64_t d = 0; d < D; d++) y[d] = w[d] * y[d];
        store_row(y, D, out_dtype, (char *)out_addr + r * D * (out_dtype == DT_F32 ? 4 : 2));
    }
    free(buf);
    return rows;
}

/* RoPE on one tensor x [A, B, T, Dh] (strides in elements, the last 1) into out (its own
 * strides), as rope.Rotary.rotate: the first `dim` dims of each row rotated with cos, sin
 * [T, dim] (cs_dtype, the dtype each product and the sum round to), the rest copied. The
 * rotated pairs are (i, i + dim/2), or with `interleaved` (2i, 2i + 1), whose results land
 * de-interleaved (evens first) as the torch code lays them out. */
/* out = x * cos + rotate_half(x) * sin over one row of 2 * half, each product and the sum
 * rounded to bf16 when `bf16` (the torch code's ops in that dtype). */
static void rotate_half(const float *restrict x, const float *restrict c, const float *restrict s,
                        float *restrict out, int64_t half, int bf16) {
    if (bf16) {
        for (int64_t i = 0; i < half; i++) out[i] = round_bf16(round_bf16(x[i] * c[i]) + round_bf16(-x[i + half] * s[i]));
        for (int64_t i = 0; i < half; i++)
            out[i + half] = round_bf16(round_bf16(x[i + half] * c[i + half]) + round_bf16(x[i] * s[i + half]));
    } else {
        for (int64_t i = 0; i < half; i++) out[i] = x[i] * c[i] + -x[i + half] * s[i];
        for (int64_t i = 0; i < half; i++) out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
}

static void rope_one(const char *x, char *out, int dtype, int64_t A, int64_t B, int64_t T, int64_t Dh, int64_t dim,
                     const int64_t *xs, const int64_t *os, const void *cos, const void *sin, int cs_dtype,
                     int interleaved, float *buf) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2, half = dim / 2;
    float *c = buf, *sn = buf + dim, *row = buf + 2 * dim, *res = buf + 3 * dim;
    for (int64_t t = 0; t < T; t++) {
        load_row((const char *)cos + t * dim * (cs_dtype == DT_F32 ? 4 : 2), cs_dtype, dim, c);
        load_row((const char *)sin + t * dim * (cs_dtype == DT_F32 ? 4 : 2), cs_dtype, dim, sn);
        for (int64_t a = 0; a < A; a++)
            for (int64_t b = 0; b < B; b++) {
                const char *xr = x + (a * xs[0] + b * xs[1] + t * xs[2]) * esize;
                char *orow = out + (a * os[0] + b * os[1] + t * os[2]) * esize;
                load_row(xr, dtype, dim, row);
                if (interleaved) { /* pairs (2i, 2i + 1) to (i, i + half), as the torch code lays them out */
                    for (int64_t i = 0; i < half; i++) res[i] = row[2 * i], res[i + half] = row[2 * i + 1];
                    memcpy(row, res, sizeof(float) * (size_t)dim);
                }
                rotate_half(row, c, sn, res, half, cs_dtype == DT_BF16);
                store_row(res, dim, dtype, orow);
                if (Dh > dim) memcpy(orow + dim * esize, xr + dim * esize, (size_t)((Dh - dim) * esize));
            }
    }
}

/* torch.topk's selection (TopKImpl.h, largest): (value, index) pairs put in order by
 * libstdc++'s std::nth_element, then the first k - 1 by std::sort, with "NaN first, then
 * greater" as the comparison; reproduced step for step, since among equal values that
 * order is the order torch returns (ties are common with bf16 logits). */
typedef struct {
    float v;
    int64_t i;
} ranked_t;

static inline int ranks_before(const ranked_t *x, const ranked_t *y) {
    return (x->v != x->v && y->v == y->v) || x->v > y->v;
}

static inline void swap_ranked(ranked_t *a, ranked_t *b) {
    const ranked_t t = *a;
    *a = *b;
    *b = t;
}

static void insertion_sort(ranked_t *first, ranked_t *last) {
    if (first == last) return;
    for (ranked_t *i = first + 1; i != last; i++) {
        const ranked_t val = *i;
        if (ranks_before(&val, first)) {
            memmove(first + 1, first, (size_t)(i - first) * sizeof(ranked_t));
            *first = val;
        } else {
            ranked_t *hole = i;
            for (ranked_t *next = i - 1; ranks_before(&val, next); next--) {
                *hole = *next;
                hole = next;
            }
            *hole = val;
        }
    }
}

/* libstdc++'s __introselect; 0 when its depth limit runs out (it then heap-selects, which
 * this does not reproduce: the caller routes in torch). */
static int nth_element(ranked_t *first, ranked_t *nth, ranked_t *last) {
    if (first == last || nth == last) return 1;
    int64_t depth = 0;
    for (int64_t n = last - first; n > 1; n >>= 1) depth++;
    depth *= 2;
    while (last - first > 3) {
        if (depth-- == 0) return 0;
        ranked_t *a = first + 1, *b = first + (last - first) / 2, *c = last - 1; /* median of three to *first */
        if (ranks_before(a, b))
            swap_ranked(first, ranks_before(b, c) ? b : ranks_before(a, c) ? c : a);
        else
            swap_ranked(first, ranks_before(a, c) ? a : ranks_before(b, c) ? c : b);
        ranked_t *lo = first + 1, *hi = last; /* unguarded partition around *first */
        for (;;) {
            while (ranks_before(lo, first)) lo++;
            hi--;
            while (ranks_before(first, hi)) hi--;
            if (!(lo < hi)) break;
            swap_ranked(lo, hi);
            lo++;
        }
        if (lo <= nth)
            first = lo;
        else
            last = lo;
    }
    insertion_sort(first, last);
    return 1;
}

/* The k best of v[0..n) in torch.topk's order into order[0..k); 0 where not reproduced
 * (see nth_element; k - 1 > 16 or k * 64 <= n take other std:: algorithms in torch). */
static int torch_topk(const float *v, int64_t n, int64_t k, int sorted, ranked_t *queue) {
    if (k - 1 > 16 || k * 64 <= n) return 0;
    for (int64_t j = 0; j < n; j++) queue[j] = (ranked_t){v[j], j};
    if (!nth_element(queue, queue + k - 1, queue + n)) return 0;
    if (sorted) insertion_sort(queue, queue + k - 1);
    return 1;
}

/* Routing of N tokens over E experts, as moe.routing.Router's torch path: scores (0 softmax
 * in torch's order with SLEEF's exp, 1 sigmoid), plus the correction bias for the choice,
 * the topk_group best groups (group_score 0: max, fill 0; 1: the sum of the two best, fill
 * -inf), the K best experts in torch.topk's order, their scores renormalised (the sum in
 * torch's order, + renorm_eps or clamped below at renorm_min when that is not NaN) and
 * scaled. ids int64 [N, K]; weights [N, K] in out_dtype. Returns N, or -3 where torch's
 * top-k order is not reproduced (nothing then counts: route in torch). */
static int64_t route(int64_t logits_addr, int logits_dtype, int64_t N, int64_t E, int64_t K, int scoring,
                     int64_t bias_addr, int bias_dtype, int64_t n_group, int64_t topk_group, int group_score,
                     int renormalize, float renorm_eps, float renorm_min, float scaling, int64_t ids_addr,
                     int64_t weights_addr, int out_dtype, int lanes) {
    float *scores = (float *)malloc(sizeof(float) * (size_t)(2 * E + K + n_group) + sizeof(ranked_t) * (size_t)E);
    if (!scores) return -2;
    float *choice = scores + E, *picked = choice + E, *group_scores = picked + K;
    ranked_t *queue = (ranked_t *)(group_scores + n_group);
    int64_t *ids = (int64_t *)ids_addr, status = N;
    /* sigmoid runs as one flat loop over N*E: torch's vector path over whole pairs of vectors, its scalar one after */
    const int64_t vector_end = N * E / (2 * lanes) * (2 * lanes);
    for (int64_t n = 0; n < N && status == N; n++) {
        for (int64_t e = 0; e < E; e++) scores[e] = load_scalar((const void *)logits_addr, n * E + e, logits_dtype);
        if (scoring == 0) {
            const float max = torch_reduce_all(scores, E, lanes, 1);
            for (int64_t e = 0; e < E; e++) scores[e] = sleef_expf(scores[e] - max);
            const float inv = 1.0f / torch_reduce_all(scores, E, lanes, 0);
            for (int64_t e = 0; e < E; e++) scores[e] *= inv;
        } else {
            for (int64_t e = 0; e < E; e++)
                scores[e] = n * E + e < vector_end ? 1.0f / (sleef_expf(0.0f - scores[e]) + 1.0f)
                                                   : 1.0f / (1.0f + expf(-scores[e]));
        }
        for (int64_t e = 0; e < E; e++)
            choice[e] = bias_addr ? scores[e] + load_scalar((const void *)bias_addr, e, bias_dtype) : scores[e];
        if (n_group > 1) {
            const int64_t per = E / n_group;
            for (int64_t g = 0; g < n_group; g++) {
                float best = -INFINITY, second = -INFINITY;
                for (int64_t e = g * per; e < (g + 1) * per; e++) {
                    const float v = choice[e];
                    if (v > best) {
                        second = best;
                        best = v;
                    } else if (v > second) {
                        second = v;
                    }
                }
                group_scores[g] = group_score == 0 ? best : best + second;
            }
            if (!torch_topk(group_scores, n_group, topk_group, 0, queue)) {
                status = -3;
                break;
            }
            const float fill = group_score == 0 ? 0.0f : -INFINITY;
            for (int64_t g = 0; g < n_group; g++) {
                int keep = 0;
                for (int64_t j = 0; j < topk_group; j++) keep |= queue[j].i == g;
                if (!keep)
                    for (int64_t e = g * per; e < (g + 1) * per; e++) choice[e] = fill;
            }
        }
        if (!torch_topk(choice, E, K, 1, queue)) {
            status = -3;
            break;
        }
        for (int64_t k = 0; k < K; k++) {
            ids[n * K + k] = queue[k].i;
            picked[k] = bias_addr ? scores[queue[k].i] : queue[k].v;
        }
        if (renormalize) {
            float total = torch_sum(picked, K, lanes);
            total = renorm_min == renorm_min ? (total < renorm_min ? renorm_min : total) : total + renorm_eps;
            for (int64_t k = 0; k < K; k++) picked[k] = picked[k] / total;
        }
        for (int64_t k = 0; k < K; k++)
            store_as((void *)weights_addr, n * K + k, out_dtype, scaling != 1.0f ? picked[k] * scaling : picked[k]);
    }
    free(scores);
    return status;
}

/* ---- Python bindings --------------------------------------------------------------- */

static PyObject *py_moe_layer(PyObject *self, PyObject *args) {
    long long x, N, D, I, ids, wts, Kk, table, E, out;
    int x_dtype, bits, wdtype, act, woi, n_threads;
    float alpha, limit;
    if (!PyArg_ParseTuple(args, "LiLLLLLLLLiiiffiLi", &x, &x_dtype, &N, &D, &I, &ids, &wts, &Kk, &table, &E,
                          &bits, &wdtype, &act, &alpha, &limit, &woi, &out, &n_threads))
        return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = moe_layer(x, x_dtype, N, D, I, ids, wts, Kk, table, E, bits, wdtype, act, alpha, limit, woi, out, n_threads);
    Py_END_ALLOW_THREADS
    if (r == -1) {
        PyErr_SetString(PyExc_ValueError, "an expert id is outside [0, n_experts)");
        return NULL;
    }
    if (r == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(r);
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    long long x, M, K, w, N, b, out;
    int x_dtype, w_dtype, n_threads;
    if (!PyArg_ParseTuple(args, "LiLLLiLLLi", &x, &x_dtype, &M, &K, &w, &w_dtype, &N, &b, &out, &n_threads))
        return NULL;
    const int64_t mats[LIN_COLS] = {[LIN_W] = w, [LIN_N] = N, [LIN_B] = b, [LIN_OUT] = out};
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = dense_linears(x, x_dtype, M, K, w_dtype, mats, 1, n_threads);
    Py_END_ALLOW_THREADS
    if (r == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(r);
}

static PyObject *py_linears(PyObject *self, PyObject *args) {
    long long x, M, K, mats;
    int x_dtype, w_dtype, n_mats, n_threads;
    if (!PyArg_ParseTuple(args, "LiLLiLii", &x, &x_dtype, &M, &K, &w_dtype, &mats, &n_mats, &n_threads)) return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = dense_linears(x, x_dtype, M, K, w_dtype, (const int64_t *)mats, n_mats, n_threads);
    Py_END_ALLOW_THREADS
    if (r == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(r);
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    long long x, rows, D, x_stride, w, out;
    int x_dtype, w_dtype, mode, out_dtype, lanes;
    float eps;
    if (!PyArg_ParseTuple(args, "LiLLLLiifLii", &x, &x_dtype, &rows, &D, &x_stride, &w, &w_dtype, &mode, &eps, &out,
                          &out_dtype, &lanes))
        return NULL;
    if (lanes < 1 || lanes > 16) {
        PyErr_SetString(PyExc_ValueError, "lanes must be in [1, 16]");
        return NULL;
    }
    const int64_t r = rms_norm(x, x_dtype, rows, D, x_stride, w, w_dtype, mode, eps, out, out_dtype, lanes);
    if (r == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(r);
}

/* Two tensors (q and k), each: x, out, dtype, A, B, T, Dh, 3 strides of x, 3 of out. */
static PyObject *py_rope(PyObject *self, PyObject *args) {
    long long x[2], out[2], A[2], B[2], T[2], Dh[2], xs[2][3], os[2][3], dim, cos, sin;
    int dtype[2], cs_dtype, interleaved;
    if (!PyArg_ParseTuple(args, "LLiLLLLLLLLLLLLiLLLLLLLLLLLLLLi", &x[0], &out[0], &dtype[0], &A[0], &B[0], &T[0],
                          &Dh[0], &xs[0][0], &xs[0][1], &xs[0][2], &os[0][0], &os[0][1], &os[0][2], &x[1], &out[1],
                          &dtype[1], &A[1], &B[1], &T[1], &Dh[1], &xs[1][0], &xs[1][1], &xs[1][2], &os[1][0],
                          &os[1][1], &os[1][2], &dim, &cos, &sin, &cs_dtype, &interleaved))
        return NULL;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(4 * dim));
    if (!buf) return PyErr_NoMemory();
    for (int i = 0; i < 2; i++) {
        const int64_t xst[3] = {xs[i][0], xs[i][1], xs[i][2]}, ost[3] = {os[i][0], os[i][1], os[i][2]};
        rope_one((const char *)x[i], (char *)out[i], dtype[i], A[i], B[i], T[i], Dh[i], dim, xst, ost,
                 (const void *)cos, (const void *)sin, cs_dtype, interleaved, buf);
    }
    free(buf);
    Py_RETURN_NONE;
}

static PyObject *py_route(PyObject *self, PyObject *args) {
    long long logits, N, E, K, bias, n_group, topk_group, ids, weights;
    int logits_dtype, scoring, bias_dtype, group_score, renormalize, out_dtype, lanes;
    float renorm_eps, renorm_min, scaling;
    if (!PyArg_ParseTuple(args, "LiLLLiLiLLiifffLLii", &logits, &logits_dtype, &N, &E, &K, &scoring, &bias,
                          &bias_dtype, &n_group, &topk_group, &group_score, &renormalize, &renorm_eps, &renorm_min,
                          &scaling, &ids, &weights, &out_dtype, &lanes))
        return NULL;
    if (lanes < 1 || lanes > 16 || K < 1 || K > E || (n_group > 1 && (E % n_group || topk_group > n_group))) {
        PyErr_SetString(PyExc_ValueError, "route: bad lanes, k or groups");
        return NULL;
    }
    const int64_t r = route(logits, logits_dtype, N, E, K, scoring, bias, bias_dtype, n_group, topk_group,
                            group_score, renormalize, renorm_eps, renorm_min, scaling, ids, weights, out_dtype, lanes);
    if (r == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(r); /* -3: not routed here (see route) */
}

/* Instruction sets by name; "avx512bf16" is AVX-512 with the bf16 dot-product path. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    long long q, k, v, B, H, Hk, T, S, Dh, Dv, mask, out;
    long long qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2;
    int dtype, n_threads;
    float scale;
    if (!PyArg_ParseTuple(args, "LLLiLLLLLLLLLLLLLLLLLfLi", &q, &k, &v, &dtype, &B, &H, &Hk, &T, &S, &Dh, &Dv,
                          &qs0, &qs1, &qs2, &ks0, &ks1, &ks2, &vs0, &vs1, &vs2, &mask, &scale, &out, &n_threads))
        return NULL;
    const int64_t qst[3] = {qs0, qs1, qs2}, kst[3] = {ks0, ks1, ks2}, vst[3] = {vs0, vs1, vs2};
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = attention(q, k, v, dtype, B, H, Hk, T, S, Dh, Dv, qst, kst, vst, mask, scale, out, n_threads);
    Py_END_ALLOW_THREADS
    if (r == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(r);
}

static PyObject *py_dequant_rows(PyObject *self, PyObject *args) {
    long long w, scale, K, r0, r1, out;
    int bits, wdtype, n_threads;
    if (!PyArg_ParseTuple(args, "LLiiLLLLi", &w, &scale, &bits, &wdtype, &K, &r0, &r1, &out, &n_threads))
        return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = dequant_rows(w, scale, bits, wdtype, K, r0, r1, out, n_threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(r);
}

static const char *ISA_NAMES[] = {"scalar", "avx2", "avx512", "avx512bf16"};

static int isa_level(void) { return current_isa() + (current_isa() == ISA_AVX512 && g_bf16dp > 0); }

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(ISA_NAMES[isa_level()]); }

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    g_isa = -1;
    g_bf16dp = -1;
    const int best = isa_level();
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, ISA_NAMES[i]) == 0) {
            if (i > best) {
                PyErr_Format(PyExc_ValueError, "this CPU cannot run %s (best: %s)", name, ISA_NAMES[best]);
                return NULL;
            }
            g_isa = i == 3 ? ISA_AVX512 : i;
            g_bf16dp = i == 3;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown instruction set '%s'", name);
    return NULL;
}

static PyObject *py_openmp(PyObject *self, PyObject *noargs) {
#ifdef _OPENMP
    return PyLong_FromLong(omp_get_max_threads());
#else
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef METHODS[] = {
    {"moe_layer", py_moe_layer, METH_VARARGS, "One MoE layer's routed experts (see moerun/kernels/cpu_experts.py)."},
    {"linear", py_linear, METH_VARARGS, "A dense layer at a few tokens (see moerun/kernels/cpu_linear.py)."},
    {"linears", py_linears, METH_VARARGS, "Dense layers sharing their input, in one call (cpu_linear.py)."},
    {"attention", py_attention, METH_VARARGS, "Attention for a few queries (see moerun/kernels/cpu_attention.py)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of a few rows (see moerun/kernels/cpu_glue.py)."},
    {"rope", py_rope, METH_VARARGS, "RoPE on q and k of a few tokens (see moerun/kernels/cpu_glue.py)."},
    {"route", py_route, METH_VARARGS, "Router scores, top-k and weights of a few tokens (see moerun/kernels/cpu_glue.py)."},
    {"dequant_rows", py_dequant_rows, METH_VARARGS, "Rows of one stored expert matrix as float32 (see moerun/kernels/cpu_experts.py)."},
    {"isa", py_isa, METH_NOARGS, "The instruction set the kernels use: avx512, avx2 or scalar."},
    {"set_isa", py_set_isa, METH_VARARGS, "Force an instruction set this CPU supports (tests)."},
    {"openmp_threads", py_openmp, METH_NOARGS, "OpenMP's thread count here, 0 when built without OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_cpu", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&MODULE); }
