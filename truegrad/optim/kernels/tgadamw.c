/* TGAdamW's CPU kernel (truegrad/optim/_native.py builds it only for fused=True on the
   CPU): plain C11 with OpenMP and no torch headers, instantiated for float and double. */
#include <stdint.h>
#include <math.h>
#include <omp.h>

#ifndef PAR_MIN
#define PAR_MIN 65536 /* loops over fewer elements run on one thread */
#endif
#define MAXT 256
/* torch's lerp (weight < 0.5: a + w*(b-a), else b - (b-a)*(1-w)); a max that keeps a NaN
   in its first argument, as clamp_min does */
#define LERP(a, b, w) ((w) < (T)0.5 ? (a) + (w) * ((b) - (a)) : (b) - ((b) - (a)) * ((T)1 - (w)))
#define MAXN(x, e) ((x) < (e) ? (e) : (x))
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define SQRT sqrtf
#define SUF(name) CAT(name, _f32)
#include "tgadamw_body.h"
#undef T
#undef SQRT
#undef SUF

#define T double
#define SQRT sqrt
#define SUF(name) CAT(name, _f64)
#include "tgadamw_body.h"
#undef T
#undef SQRT
#undef SUF
