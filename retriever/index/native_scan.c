/* Dot products of queries with fp16 rows or uint8 SQ8 codes (AVX2, FMA, F16C), for retriever/index/native.py.
 *
 * A scan of one or two queries is bound by memory bandwidth, not arithmetic: the point of these kernels is to
 * read each row once, at memory speed, converting it in registers. Callers split the rows between threads.
 * Every row is summed in the same order whichever path visits it, so equal rows always score equal.
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}

static inline float dot_f16_row(const uint16_t *row, const float *q, size_t d) {
    __m256 acc = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 8 <= d; j += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))), _mm256_loadu_ps(q + j), acc);
    float s = hsum_ps(acc);
    for (; j < d; j++) s += _cvtsh_ss(row[j]) * q[j];
    return s;
}

/* out[qi * ldo + i] = queries[qi] . rows[i]: rows (n, d) fp16, queries (nq, d) fp32, out (nq, ldo >= n) fp32. */
void dot_f16(const uint16_t *rows, size_t n, size_t d, const float *queries, size_t nq, float *out, size_t ldo) {
    const size_t block = 4; /* 4 rows x 1 query per pass: 4 independent FMA chains; rows stay in L1 for the rest */
    size_t i = 0;
    if (d % 8 == 0) {
        for (; i + block <= n; i += block) {
            const uint16_t *r0 = rows + i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
            for (size_t qi = 0; qi < nq; qi++) {
                const float *q = queries + qi * d;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (size_t j = 0; j < d; j += 8) {
                    __m256 qv = _mm256_loadu_ps(q + j);
                    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r0 + j))), qv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r1 + j))), qv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r2 + j))), qv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r3 + j))), qv, a3);
                }
                float *o = out + qi * ldo + i;
                o[0] = hsum_ps(a0), o[1] = hsum_ps(a1), o[2] = hsum_ps(a2), o[3] = hsum_ps(a3);
            }
        }
    }
    for (; i < n; i++)
        for (size_t qi = 0; qi < nq; qi++) out[qi * ldo + i] = dot_f16_row(rows + i * d, queries + qi * d, d);
}

static inline int32_t dot_u8_row(const uint8_t *row, const int8_t *q, size_t d) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    size_t j = 0;
    for (; j + 32 <= d; j += 32) {
        __m256i pairs = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(row + j)),
                                             _mm256_loadu_si256((const __m256i *)(q + j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
    }
    int32_t s = hsum_epi32(acc);
    for (; j < d; j++) s += (int32_t)row[j] * (int32_t)q[j];
    return s;
}

/* out[qi * ldo + i] = sum_j codes[i, j] * queries[qi, j]: codes (n, d) uint8, queries (nq, d) int8 in [-64, 64]
 * (so that maddubs' int16 pair sums, at most 2 * 255 * 64, never saturate), out (nq, ldo >= n) int32. */
void dot_u8s8(const uint8_t *codes, size_t n, size_t d, const int8_t *queries, size_t nq, int32_t *out, size_t ldo) {
    if (nq == 1) { /* one stream of rows: measured faster than the blocked loop for a single query */
        for (size_t i = 0; i < n; i++) out[i] = dot_u8_row(codes + i * d, queries, d);
        return;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const size_t block = 16; /* 16 rows (16 KB at d = 1,024) stay in L1 while every query passes over them */
    for (size_t i0 = 0; i0 < n; i0 += block) {
        size_t i1 = i0 + block < n ? i0 + block : n;
        for (size_t qi = 0; qi < nq; qi++) {
            const int8_t *q = queries + qi * d;
            int32_t *o = out + qi * ldo;
            size_t i = i0;
            if (d % 32 == 0) {
                for (; i + 4 <= i1; i += 4) { /* 4 rows at once: each query vector load serves 4 rows */
                    const uint8_t *r0 = codes + i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
                    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                    for (size_t j = 0; j < d; j += 32) {
                        __m256i qv = _mm256_loadu_si256((const __m256i *)(q + j));
                        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(r0 + j)), qv), ones));
                        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(r1 + j)), qv), ones));
                        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(r2 + j)), qv), ones));
                        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(r3 + j)), qv), ones));
                    }
                    o[i] = hsum_epi32(a0), o[i + 1] = hsum_epi32(a1), o[i + 2] = hsum_epi32(a2), o[i + 3] = hsum_epi32(a3);
                }
            }
            for (; i < i1; i++) o[i] = dot_u8_row(codes + i * d, q, d);
        }
    }
}
