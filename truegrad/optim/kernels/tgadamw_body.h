/* TGAdamW's CPU kernel: the body of one element type (T, SQRT, SUF set by tgadamw.c).
   Compiled and loaded by truegrad/optim/_native.py (see its docstring for the math and the
   element passes); never included anywhere else. */
static void SUF(moments_norms)(int64_t n, const T *g, const T *s, T *m, T *v, T *u,
                       double sign_, double w1_, double b2_, double w2_, double w3_,
                       double eps_v_, double eps_u_, double *out, int nt) {
    const T sign = (T)sign_, w1 = (T)w1_, b2 = (T)b2_, w2 = (T)w2_, w3 = (T)w3_;
    const T eps_v = (T)eps_v_, eps_u = (T)eps_u_;
    /* per-thread partial sums, added in thread order afterwards: an OpenMP reduction
       combines them in arrival order, which would make the step nondeterministic */
    double part[2 * MAXT];
    if (nt > MAXT) nt = MAXT;
    for (int t = 0; t < 2 * nt; t++) part[t] = 0.0;
    #pragma omp parallel num_threads(nt) if(n >= PAR_MIN)
    {
        int me = omp_get_thread_num(), count = omp_get_num_threads();
        int64_t chunk = (n + count - 1) / count, lo = me * chunk;
        int64_t hi = lo + chunk < n ? lo + chunk : n;
        double sa = 0.0, st = 0.0;
        #pragma omp simd reduction(+:sa, st)
        for (int64_t i = lo; i < hi; i++) {
            T gi = g[i] * sign;
            T mi = LERP(m[i], gi, w1);
            T vi = v[i] * b2 + w2 * gi * gi;
            T ui = LERP(u[i], s[i], w3);
            m[i] = mi; v[i] = vi; u[i] = ui;
            T a = mi / MAXN(SQRT(vi), eps_v);
            T t = mi / MAXN(SQRT(ui), eps_u);
            sa += (double)a * (double)a;
            st += (double)t * (double)t;
        }
        part[2 * me] = sa; part[2 * me + 1] = st;
    }
    double sa = 0.0, st = 0.0;
    for (int t = 0; t < nt; t++) { sa += part[2 * t]; st += part[2 * t + 1]; }
    out[0] = sa; out[1] = st;
}

static void SUF(apply_true)(int64_t n, T *p, const T *m, const T *u,
                    double decay_, double eps_u_, double coef_, int nt) {
    const T decay = (T)decay_, eps_u = (T)eps_u_, coef = (T)coef_;
    #pragma omp parallel for simd num_threads(nt) if(n >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        T t = m[i] / MAXN(SQRT(u[i]), eps_u);
        p[i] = p[i] * decay + coef * t;
    }
}

static void SUF(step_true)(int64_t n, T *p, const T *g, const T *s, T *m, T *v, T *u,
                   double sign_, double w1_, double b2_, double w2_, double w3_,
                   double eps_u_, double decay_, double coef_, int nt) {
    const T sign = (T)sign_, w1 = (T)w1_, b2 = (T)b2_, w2 = (T)w2_, w3 = (T)w3_;
    const T eps_u = (T)eps_u_, decay = (T)decay_, coef = (T)coef_;
    #pragma omp parallel for simd num_threads(nt) if(n >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        T gi = g[i] * sign;
        T mi = LERP(m[i], gi, w1);
        T ui = LERP(u[i], s[i], w3);
        m[i] = mi; v[i] = v[i] * b2 + w2 * gi * gi; u[i] = ui;
        p[i] = p[i] * decay + coef * (mi / MAXN(SQRT(ui), eps_u));
    }
}

static void SUF(step_adam)(int64_t n, T *p, const T *g, T *m, T *v,
                   double sign_, double w1_, double b2_, double w2_,
                   double eps_v_, double decay_, double coef_, int nt) {
    const T sign = (T)sign_, w1 = (T)w1_, b2 = (T)b2_, w2 = (T)w2_;
    const T eps_v = (T)eps_v_, decay = (T)decay_, coef = (T)coef_;
    #pragma omp parallel for simd num_threads(nt) if(n >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        T gi = g[i] * sign;
        T mi = LERP(m[i], gi, w1);
        T vi = v[i] * b2 + w2 * gi * gi;
        m[i] = mi; v[i] = vi;
        p[i] = p[i] * decay + coef * (mi / MAXN(SQRT(vi), eps_v));
    }
}

/* One step over k tensors of one dtype. s[j] == NULL: AdamW update of tensor j. */
void SUF(tgadamw)(int64_t k, const int64_t *n, T **p, T **g, T **s, T **m, T **v, T **u,
                 const double *eps_v, const double *eps_u, const double *k_v, const double *k_u,
                 double sign, double w1, double b2, double w2, double w3, double decay,
                 double lr, double eps, int graft, int nt) {
    double sums[2];
    for (int64_t j = 0; j < k; j++) {
        if (s[j] == 0) {
            SUF(step_adam)(n[j], p[j], g[j], m[j], v[j], sign, w1, b2, w2, eps_v[j], decay,
                          -lr * k_v[j], nt);
        } else if (graft) {
            SUF(moments_norms)(n[j], g[j], s[j], m[j], v[j], u[j], sign, w1, b2, w2, w3,
                              eps_v[j], eps_u[j], sums, nt);
            /* lr * true * ||adam|| / (||true|| + eps), with k_v, k_u folded in (_StepScalars) */
            double coef = -lr * k_v[j] * (sqrt(sums[0]) / (sqrt(sums[1]) + eps / k_u[j]));
            SUF(apply_true)(n[j], p[j], m[j], u[j], decay, eps_u[j], coef, nt);
        } else {
            SUF(step_true)(n[j], p[j], g[j], s[j], m[j], v[j], u[j], sign, w1, b2, w2, w3,
                          eps_u[j], decay, -lr * k_u[j], nt);
        }
    }
}
