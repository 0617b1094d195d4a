// Reference descriptors from the ORIGINAL dlib runtime, for tests/test_loader_dlib.py.
//
// Usage: dlib_reference MODEL.dat INPUTS.u8 N OUTPUTS.f32
//   INPUTS.u8  : N images, each 150 rows x 150 columns x 3 (R, G, B), uint8, row-major
//   OUTPUTS.f32: N x 128 float32 little-endian descriptors, exactly what net(images) returns
//
// The network type is the one dlib's examples/dnn_face_recognition_ex.cpp uses for
// dlib_face_recognition_resnet_model_v1.dat (29 conv layers, affine instead of batch-norm).
// Built by tools/make_references/make_dlib_reference.py.

#include <dlib/dnn.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

using namespace dlib;

namespace anet
{
    template <int N, template <typename> class BN, int stride, typename SUBNET>
    using block = BN<con<N, 3, 3, 1, 1, relu<BN<con<N, 3, 3, stride, stride, SUBNET>>>>>;

    // Identity residual: output = block(x) + x.
    template <int N, template <typename> class BN, typename SUBNET>
    using residual = add_prev1<block<N, BN, 1, tag1<SUBNET>>>;

    // Down-sampling residual: output = block_stride2(x) + avg_pool_2x2(x), sizes padded with zeros.
    template <int N, template <typename> class BN, typename SUBNET>
    using residual_down = add_prev2<avg_pool<2, 2, 2, 2, skip1<tag2<block<N, BN, 2, tag1<SUBNET>>>>>>;

    template <int N, typename SUBNET> using ares = relu<residual<N, affine, SUBNET>>;
    template <int N, typename SUBNET> using ares_down = relu<residual_down<N, affine, SUBNET>>;

    template <typename SUBNET> using level0 = ares_down<256, SUBNET>;
    template <typename SUBNET> using level1 = ares<256, ares<256, ares_down<256, SUBNET>>>;
    template <typename SUBNET> using level2 = ares<128, ares<128, ares_down<128, SUBNET>>>;
    template <typename SUBNET> using level3 = ares<64, ares<64, ares<64, ares_down<64, SUBNET>>>>;
    template <typename SUBNET> using level4 = ares<32, ares<32, ares<32, SUBNET>>>;

    using net_type = loss_metric<fc_no_bias<128, avg_pool_everything<
        level0<level1<level2<level3<level4<
        max_pool<3, 3, 2, 2, relu<affine<con<32, 7, 7, 2, 2,
        input_rgb_image_sized<150>>>>>>>>>>>>>;
}

static std::vector<matrix<rgb_pixel>> read_images(const std::string& path, long count)
{
    const long side = 150;
    std::ifstream in(path, std::ios::binary);
    std::vector<uint8_t> bytes(static_cast<size_t>(count * side * side * 3));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!in)
        throw std::runtime_error("could not read " + std::to_string(bytes.size()) + " bytes from " + path);
    std::vector<matrix<rgb_pixel>> images(static_cast<size_t>(count));
    size_t at = 0;
    for (auto& img : images)
    {
        img.set_size(side, side);
        for (long r = 0; r < side; ++r)
            for (long c = 0; c < side; ++c, at += 3)
                img(r, c) = rgb_pixel(bytes[at], bytes[at + 1], bytes[at + 2]);
    }
    return images;
}

int main(int argc, char** argv) try
{
    if (argc != 5)
    {
        std::cerr << "usage: dlib_reference MODEL.dat INPUTS.u8 N OUTPUTS.f32\n";
        return 2;
    }
    anet::net_type net;
    deserialize(argv[1]) >> net;
    const auto images = read_images(argv[2], std::stol(argv[3]));
    const std::vector<matrix<float, 0, 1>> descriptors = net(images);
    std::ofstream out(argv[4], std::ios::binary);
    for (const auto& d : descriptors)
        out.write(reinterpret_cast<const char*>(&d(0)), static_cast<std::streamsize>(d.size() * sizeof(float)));
    std::cout << "wrote " << descriptors.size() << " descriptors of " << descriptors[0].size() << " floats\n";
    return out ? 0 : 1;
}
catch (const std::exception& e)
{
    std::cerr << "error: " << e.what() << "\n";
    return 1;
}
