/* Dot products of queries with fp16 rows or uint8 SQ8 codes (AVX2, FMA, F16C), for retriever/index/native.py.
 *
 * A scan of one or two queries is bound by memory bandwidth, not arithmetic: the point of these kernels is to
 * read each row once, at memory speed, converting it in registers. Callers split the rows between threads.
 * Every row is summed by the same code in the same order, so equal rows always score equal.
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

/* Prefetch the 128 bytes 1 KB ahead of p: measured +5-10% of the read bandwidth over the hardware prefetcher
 * alone (1 KB beat 2, 4 and 8 KB). A prefetch past the table's end does not fault. */
#define AHEAD(p) (_mm_prefetch((p) + 1024, _MM_HINT_T0), _mm_prefetch((p) + 1088, _MM_HINT_T0))
#define HALVES(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

/* One row at a time, 8 accumulators: 8 independent FMA chains hide the conversion and FMA latencies. Measured
 * faster than 4 (81% -> 87% of the read bandwidth) and than 4 rows at once, whose streams sit 4 KB apart at
 * d = 1,024 (4K aliasing: 55%). */
static inline float dot_f16_row(const uint16_t *row, const float *q, size_t d) {
    __m256 acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 64 <= d; j += 64) {
        AHEAD((const char *)(row + j));
        for (int k = 0; k < 8; k++)
            acc[k] = _mm256_fmadd_ps(HALVES(row + j + 8 * k), _mm256_loadu_ps(q + j + 8 * k), acc[k]);
    }
    for (; j + 8 <= d; j += 8) acc[0] = _mm256_fmadd_ps(HALVES(row + j), _mm256_loadu_ps(q + j), acc[0]);
    __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
                               _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])));
    float s = hsum_ps(sum);
    for (; j < d; j++) s += _cvtsh_ss(row[j]) * q[j];
    return s;
}

/* out[qi * ldo + i] = queries[qi] . rows[i]: rows (n, d) fp16, queries (nq, d) fp32, out (nq, ldo >= n) fp32.
 * Each row is read from memory once; the other queries find it in L1. */
void dot_f16(const uint16_t *rows, size_t n, size_t d, const float *queries, size_t nq, float *out, size_t ldo) {
    for (size_t i = 0; i < n; i++)
        for (size_t qi = 0; qi < nq; qi++) out[qi * ldo + i] = dot_f16_row(rows + i * d, queries + qi * d, d);
}

#define BYTES(p) _mm256_loadu_si256((const __m256i *)(p))
#define PAIRS(r, q) _mm256_madd_epi16(_mm256_maddubs_epi16(BYTES(r), BYTES(q)), ones)

/* One row, 4 accumulators (measured 77% -> 89% of the read bandwidth against one; 91% with AHEAD). */
static inline int32_t dot_u8_row(const uint8_t *row, const int8_t *q, size_t d) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t j = 0;
    for (; j + 128 <= d; j += 128) {
        AHEAD((const char *)(row + j));
        a0 = _mm256_add_epi32(a0, PAIRS(row + j, q + j));
        a1 = _mm256_add_epi32(a1, PAIRS(row + j + 32, q + j + 32));
        a2 = _mm256_add_epi32(a2, PAIRS(row + j + 64, q + j + 64));
        a3 = _mm256_add_epi32(a3, PAIRS(row + j + 96, q + j + 96));
    }
    for (; j + 32 <= d; j += 32) a0 = _mm256_add_epi32(a0, PAIRS(row + j, q + j));
    int32_t s = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
    for (; j < d; j++) s += (int32_t)row[j] * (int32_t)q[j];
    return s;
}

/* out[qi * ldo + i] = sum_j codes[i, j] * queries[qi, j]: codes (n, d) uint8, queries (nq, d) int8 in [-64, 64]
 * (so that maddubs' int16 pair sums, at most 2 * 255 * 64, never saturate), out (nq, ldo >= n) int32. */
void dot_u8s8(const uint8_t *codes, size_t n, size_t d, const int8_t *queries, size_t nq, int32_t *out, size_t ldo) {
    if (nq == 1) { /* one stream of rows: measured faster than the 4-row loop for a single query */
        for (size_t i = 0; i < n; i++) out[i] = dot_u8_row(codes + i * d, queries, d);
        return;
    }
    const __m256i ones = _mm256_set1_epi16(1);  /* used by PAIRS */
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
                        a0 = _mm256_add_epi32(a0, PAIRS(r0 + j, q + j));
                        a1 = _mm256_add_epi32(a1, PAIRS(r1 + j, q + j));
                        a2 = _mm256_add_epi32(a2, PAIRS(r2 + j, q + j));
                        a3 = _mm256_add_epi32(a3, PAIRS(r3 + j, q + j));
                    }
                    o[i] = hsum_epi32(a0), o[i + 1] = hsum_epi32(a1), o[i + 2] = hsum_epi32(a2), o[i + 3] = hsum_epi32(a3);
                }
            }
            for (; i < i1; i++) o[i] = dot_u8_row(codes + i * d, q, d);
        }
    }
}

/* -- top-k without a score array: a heap per query ---------------------------------------------------------- */

/* The k best (score, row) of one query, as a heap whose root is the worst kept: the lowest score, and among
 * equal scores the highest row. Rows arrive in increasing order, so a later row replaces the root only with a
 * strictly higher score: ties keep the lower row, as a stable sort would. Empty slots hold (-inf, -1). */
static void heap_push(double *score, int64_t *row, size_t k, double s, int64_t i) {
    if (!(s > score[0])) return;
    size_t at = 0;
    for (;;) {
        size_t child = 2 * at + 1;
        if (child >= k) break;
        size_t right = child + 1;
        if (right < k && (score[right] < score[child] || (score[right] == score[child] && row[right] > row[child])))
            child = right;
        if (!(score[child] < s)) break;  /* an equal score is from an earlier row: better than the newcomer */
        score[at] = score[child], row[at] = row[child];
        at = child;
    }
    score[at] = s, row[at] = i;
}

#define TOP_BLOCK 64   /* SQ8 rows scored at a time into a stack buffer before they meet the heaps */
#define TOP_QUERIES 64 /* SQ8 queries per pass over the codes: the buffer is 64 x 64 int32, 16 KB */

static void heaps_init(double *score, int64_t *row, size_t count) {
    for (size_t i = 0; i < count; i++) score[i] = -__builtin_inf(), row[i] = -1;
}

#define TOP_BLOCK_F16 32 /* 32 fp16 rows (64 KB at d = 1,024) stay in L2 while each query passes over them */

/* best_score, best_row (nq, k): each query's k best rows of rows (n, d) fp16, unordered (callers sort). */
void top_f16(const uint16_t *rows, size_t n, size_t d, const float *queries, size_t nq, size_t k,
             double *best_score, int64_t *best_row) {
    float buffer[TOP_BLOCK_F16];
    heaps_init(best_score, best_row, nq * k);
    for (size_t i0 = 0; i0 < n; i0 += TOP_BLOCK_F16) {
        size_t m = n - i0 < TOP_BLOCK_F16 ? n - i0 : TOP_BLOCK_F16;
        for (size_t qi = 0; qi < nq; qi++) {
            dot_f16(rows + i0 * d, m, d, queries + qi * d, 1, buffer, TOP_BLOCK_F16);
            for (size_t i = 0; i < m; i++) heap_push(best_score + qi * k, best_row + qi * k, k, buffer[i], (int64_t)(i0 + i));
        }
    }
}

/* best_score, best_row (nq, k): each query's k best rows of codes (n, d) uint8 (see dot_u8s8), unordered. */
void top_u8s8(const uint8_t *codes, size_t n, size_t d, const int8_t *queries, size_t nq, size_t k,
              double *best_score, int64_t *best_row) {
    int32_t buffer[TOP_QUERIES * TOP_BLOCK];
    heaps_init(best_score, best_row, nq * k);
    for (size_t q0 = 0; q0 < nq; q0 += TOP_QUERIES) {
        size_t batch = nq - q0 < TOP_QUERIES ? nq - q0 : TOP_QUERIES;
        for (size_t i0 = 0; i0 < n; i0 += TOP_BLOCK) {
            size_t m = n - i0 < TOP_BLOCK ? n - i0 : TOP_BLOCK;
            dot_u8s8(codes + i0 * d, m, d, queries + q0 * d, batch, buffer, TOP_BLOCK);
            for (size_t qi = 0; qi < batch; qi++)
                for (size_t i = 0; i < m; i++)
                    heap_push(best_score + (q0 + qi) * k, best_row + (q0 + qi) * k, k, buffer[qi * TOP_BLOCK + i],
                              (int64_t)(i0 + i));
        }
    }
}
