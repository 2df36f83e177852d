// AVX-512 + AVX512-BF16 path: isa_avx512.cpp compiled with NF4LORA_AVX512_BF16=1, in
// namespace avx512bf16. Same kernels; the fused GEMV for bf16 activations decodes W to
// bf16 and multiplies with vdpbf16ps (GemvBf16Decoder in isa_avx512.cpp).
#define NF4LORA_AVX512_BF16 1
#include "isa_avx512.cpp"
