//! Where models run: the first CUDA device when libtorch can see one, the CPU otherwise.

use tch::{Cuda, Device};

/// The device models are placed on.
pub fn inference_device() -> Device {
    if Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// A short name for `/info` and logs: `cuda:0` or `cpu`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Cpu => "cpu".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;

    #[test]
    fn libtorch_computes_on_the_inference_device() {
        let device = inference_device();
        let a = Tensor::from_slice2(&[[1f32, 2.], [3., 4.]]).to_device(device);
        let product = a.matmul(&a).to_device(Device::Cpu);
        let values: Vec<f32> = product.flatten(0, -1).try_into().unwrap();
        assert_eq!(values, [7., 10., 15., 22.]);
        assert_eq!(product.kind(), Kind::Float);
    }

    #[test]
    fn device_names_are_the_ones_info_reports() {
        assert_eq!(device_name(Device::Cpu), "cpu");
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
    }
}
