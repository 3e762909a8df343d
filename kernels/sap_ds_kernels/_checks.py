"""Input checks shared by the kernels: one cheap pass of Python per call, clear messages."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _names(dtypes):
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {_names(dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a flat shard), got strides {t.stride()}")


def check_same_numel(name_a: str, a, name_b: str, b) -> None:
    if a.numel() != b.numel():
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of elements: "
            f"{name_a} has shape {tuple(a.shape)} ({a.numel()}), "
            f"{name_b} has shape {tuple(b.shape)} ({b.numel()})"
        )


def check_same_device(*named) -> None:
    devices = {str(t.device) for _, t in named}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"tensors must be on one device: {listing}")


def check_scale(scale, device) -> None:
    check_tensor("scale", scale, (torch.float32,))
    if scale.numel() != 1:
        raise ValueError(f"scale must be a 0-dim or 1-element tensor, got shape {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but master is on {device}")
