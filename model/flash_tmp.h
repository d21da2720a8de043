/* TEMP: the flash API (helper provides the real one in model/model.h) */
enum model_attn_mask { MODEL_MASK_FULL, MODEL_MASK_CAUSAL };
struct model_attn_blocks {
    int B, Tq, Tk;
    size_t q_seq, k_seq;
    int Hl, Gl, hd;
    enum model_attn_mask mask;
};
void model_flash_forward(float *out, float *lse, const float *q, const float *k,
                         const float *v, const struct model_attn_blocks *g, bool merge,
                         float *scratch);
void model_flash_delta(float *delta, const float *dout, const float *out,
                       const struct model_attn_blocks *g);
void model_flash_backward(float *dq, float *dk, float *dv, const float *dout,
                          const float *lse, const float *delta, const float *q,
                          const float *k, const float *v, const struct model_attn_blocks *g,
                          float *scratch);
size_t model_flash_scratch_floats(int Tk, int hd);
