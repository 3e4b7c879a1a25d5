/*
 * Region-of-interest JPEG decoding with libjpeg-turbo: decode only the rows and the column band
 * of a crop box, optionally at 1/2, 1/4 or 1/8 scale in the DCT domain.
 *
 * Why by hand: RandomResizedCrop keeps on average about half of an image, and libjpeg-turbo can
 * skip the inverse DCT, upsampling and colour conversion of everything outside the box
 * (jpeg_skip_scanlines, jpeg_crop_scanline), which is most of a decode's cost after entropy
 * decoding. torchvision.io and PIL decode whole images; libjpeg-turbo 3's TurboJPEG API exposes
 * partial decoding, but Debian 12 ships 2.1, whose TurboJPEG API does not. The functions are
 * plain C with C types so that both Python (ctypes) and FFCV's numba-compiled pipeline can call
 * them without the GIL.
 *
 * Contract of every function: returns FT_JPEG_OK or a negative code, never exits or longjmps
 * out, and writes a NUL-terminated reason into `err` (capacity `err_size`) on failure.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define FT_JPEG_OK 0
#define FT_JPEG_ERROR -1       /* corrupt or not a JPEG */
#define FT_JPEG_UNSUPPORTED -2 /* a JPEG this decoder does not turn into RGB (CMYK, YCCK) */
#define FT_JPEG_BAD_ARGUMENT -3
#define FT_JPEG_WARNING 1      /* decoded, but libjpeg warned (corrupt data it decoded past) */

/* C linkage even when the build compiles this file as C++ (torch's BuildExtension does). */
#ifdef __cplusplus
#define FT_LINKAGE extern "C"
#else
#define FT_LINKAGE
#endif
#if defined(__GNUC__)
#define FT_EXPORT FT_LINKAGE __attribute__((visibility("default")))
#else
#define FT_EXPORT FT_LINKAGE
#endif

struct ft_error_mgr {
    struct jpeg_error_mgr base;
    jmp_buf escape;
    char* err;
    size_t err_size;
    int keep_warning; /* ft_jpeg_check: the first warning's text goes to `err` */
};

/* libjpeg's default error_exit calls exit(): jump back to the caller instead. */
static void ft_error_exit(j_common_ptr cinfo) {
    struct ft_error_mgr* mgr = (struct ft_error_mgr*)cinfo->err;
    if (mgr->err != NULL && mgr->err_size > 0) {
        char message[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, message);
        snprintf(mgr->err, mgr->err_size, "%s", message);
    }
    longjmp(mgr->escape, 1);
}

/* Warnings (e.g. extraneous bytes) are not errors; libjpeg would print them to stderr.
 * libjpeg's emit_message passes only the first warning of a decode here. */
static void ft_output_message(j_common_ptr cinfo) {
    struct ft_error_mgr* mgr = (struct ft_error_mgr*)cinfo->err;
    if (mgr->keep_warning && mgr->err != NULL && mgr->err_size > 0) {
        char message[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, message);
        snprintf(mgr->err, mgr->err_size, "%s", message);
    }
}

static void set_error(char* err, size_t err_size, const char* format, ...) {
    if (err == NULL || err_size == 0) return;
    va_list args;
    va_start(args, format);
    vsnprintf(err, err_size, format, args);
    va_end(args);
}

/* A decompressor whose errors land in `mgr` (the caller must setjmp(mgr->escape) next: the jump
 * target has to be a frame that is still live) and whose warnings are dropped. */
static void create_decompress(struct jpeg_decompress_struct* cinfo, struct ft_error_mgr* mgr,
                              char* err, uint64_t err_size) {
    cinfo->err = jpeg_std_error(&mgr->base);
    mgr->base.error_exit = ft_error_exit;
    mgr->base.output_message = ft_output_message;
    mgr->err = err;
    mgr->err_size = (size_t)err_size;
    mgr->keep_warning = 0;
    jpeg_create_decompress(cinfo);
}

/* Every colour space libjpeg converts to RGB itself: YCbCr, RGB and grayscale. */
static int rgb_convertible(J_COLOR_SPACE space) {
    return space == JCS_YCbCr || space == JCS_RGB || space == JCS_GRAYSCALE;
}

/*
 * Image height and width from the headers (no decoding). `supported` is set to 1 when
 * ft_jpeg_decode_region can decode the image to RGB, 0 for CMYK/YCCK (decode those elsewhere).
 */
FT_EXPORT int ft_jpeg_info(const uint8_t* data, uint64_t size, int32_t* height, int32_t* width,
                           int32_t* supported, char* err, uint64_t err_size) {
    struct jpeg_decompress_struct cinfo;
    struct ft_error_mgr mgr;
    if (data == NULL || size == 0) {
        set_error(err, err_size, "empty input");
        return FT_JPEG_BAD_ARGUMENT;
    }
    create_decompress(&cinfo, &mgr, err, err_size);
    if (setjmp(mgr.escape)) {
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_ERROR;
    }
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    *height = (int32_t)cinfo.image_height;
    *width = (int32_t)cinfo.image_width;
    *supported = rgb_convertible(cinfo.jpeg_color_space);
    jpeg_destroy_decompress(&cinfo);
    return FT_JPEG_OK;
}

/*
 * Decode the box rows [top, top + height) x columns [left, left + width) of the image scaled by
 * 1/scale_denom (scale_denom in {1, 2, 4, 8}; the scaled image is ceil(H / scale_denom) x
 * ceil(W / scale_denom), libjpeg's rounding) into `out`: height x width x 3 RGB bytes, rows
 * packed. The pixels are those of a full decode at that scale with the same settings (accurate
 * integer IDCT, fancy upsampling), up to upsampling differences next to the box's left and right
 * edges where libjpeg treats the column band's edge as the image edge.
 */
FT_EXPORT int ft_jpeg_decode_region(const uint8_t* data, uint64_t size, int32_t scale_denom,
                                    int32_t top, int32_t left, int32_t height, int32_t width,
                                    uint8_t* out, char* err, uint64_t err_size) {
    struct jpeg_decompress_struct cinfo;
    struct ft_error_mgr mgr;
    JSAMPLE* volatile row = NULL; /* volatile: freed after a longjmp */
    if (data == NULL || size == 0 || out == NULL) {
        set_error(err, err_size, "empty input or output");
        return FT_JPEG_BAD_ARGUMENT;
    }
    if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8) {
        set_error(err, err_size, "scale_denom must be 1, 2, 4 or 8");
        return FT_JPEG_BAD_ARGUMENT;
    }
    if (top < 0 || left < 0 || height <= 0 || width <= 0) {
        set_error(err, err_size, "box must have top, left >= 0 and height, width > 0");
        return FT_JPEG_BAD_ARGUMENT;
    }
    create_decompress(&cinfo, &mgr, err, err_size);
    if (setjmp(mgr.escape)) {
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_ERROR;
    }
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if (!rgb_convertible(cinfo.jpeg_color_space)) {
        set_error(err, err_size, "colour space not convertible to RGB by libjpeg (CMYK/YCCK)");
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_UNSUPPORTED;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);
    if ((uint64_t)top + (uint64_t)height > cinfo.output_height ||
        (uint64_t)left + (uint64_t)width > cinfo.output_width) {
        set_error(err, err_size, "box rows %d+%d, columns %d+%d outside the %ux%u image", top,
                 height, left, width, cinfo.output_height, cinfo.output_width);
        jpeg_abort_decompress(&cinfo);
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_BAD_ARGUMENT;
    }
    /* The band starts at an iMCU column boundary at or left of `left`, and may be wider. */
    JDIMENSION band_left = (JDIMENSION)left, band_width = (JDIMENSION)width;
    if ((JDIMENSION)width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &band_left, &band_width);
    row = (JSAMPLE*)malloc((size_t)band_width * 3);
    if (row == NULL) {
        set_error(err, err_size, "out of memory");
        jpeg_abort_decompress(&cinfo);
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_ERROR;
    }
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    const size_t offset = ((size_t)left - band_left) * 3, row_bytes = (size_t)width * 3;
    /* When the band is the box (whole rows), rows go straight to `out`: the copy through `row`
     * costs ~5 % of a whole-image decode. */
    const int direct = offset == 0 && band_width == (JDIMENSION)width;
    for (int32_t r = 0; r < height; ++r) {
        JSAMPROW rows[1] = {direct ? out + (size_t)r * row_bytes : row};
        if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) {
            set_error(err, err_size, "decoder returned no row %d", top + r);
            free(row);
            jpeg_abort_decompress(&cinfo);
            jpeg_destroy_decompress(&cinfo);
            return FT_JPEG_ERROR;
        }
        if (!direct) memcpy(out + (size_t)r * row_bytes, row + offset, row_bytes);
    }
    free(row);
    /* Stopping early is allowed: jpeg_abort releases the remaining state. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return FT_JPEG_OK;
}

/*
 * Decode the whole image (any colour space, into one reused row) to find damage libjpeg decodes
 * past with only a warning ("Corrupt JPEG data: 216 extraneous bytes before marker 0xda"): such a
 * file trains on damaged pixels without an error. Returns FT_JPEG_OK, FT_JPEG_WARNING with the
 * first warning in `err`, or FT_JPEG_ERROR with the error in `err`.
 */
FT_EXPORT int ft_jpeg_check(const uint8_t* data, uint64_t size, char* err, uint64_t err_size) {
    struct jpeg_decompress_struct cinfo;
    struct ft_error_mgr mgr;
    JSAMPLE* volatile row = NULL; /* volatile: freed after a longjmp */
    if (data == NULL || size == 0) {
        set_error(err, err_size, "empty input");
        return FT_JPEG_BAD_ARGUMENT;
    }
    if (err != NULL && err_size > 0) err[0] = '\0';
    create_decompress(&cinfo, &mgr, err, err_size);
    mgr.keep_warning = 1;
    if (setjmp(mgr.escape)) {
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_ERROR;
    }
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    jpeg_start_decompress(&cinfo);
    row = (JSAMPLE*)malloc((size_t)cinfo.output_width * (size_t)cinfo.output_components);
    if (row == NULL) {
        set_error(err, err_size, "out of memory");
        jpeg_abort_decompress(&cinfo);
        jpeg_destroy_decompress(&cinfo);
        return FT_JPEG_ERROR;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(&cinfo, rows, 1);
    }
    jpeg_finish_decompress(&cinfo); /* reads to the end marker: warnings after the image too */
    free(row);
    const long warnings = cinfo.err->num_warnings;
    jpeg_destroy_decompress(&cinfo);
    return warnings ? FT_JPEG_WARNING : FT_JPEG_OK;
}

/* libjpeg-turbo's version, for the record of what a benchmark ran with. */
FT_EXPORT int ft_jpeg_lib_version(void) {
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
    return LIBJPEG_TURBO_VERSION_NUMBER;
#else
    return JPEG_LIB_VERSION;
#endif
}

/* An importable module so the library is a normal package file; the API is ctypes (above). */
static struct PyModuleDef ft_jpeg_module = {PyModuleDef_HEAD_INIT, "_jpeg",
                                            "Region JPEG decoding; use fasttrain.data.jpeg.",
                                            -1, NULL};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&ft_jpeg_module); }
