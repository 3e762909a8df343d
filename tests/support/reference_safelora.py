"""SafeLoRA as the authors' code computes it: IBM/SafeLoRA ``model.py`` (class ``SafeLoRA``),
transcribed line by line into plain PyTorch, independent of ``sap_ds.methods.safelora``.

Kept literal on purpose, including what sap-ds does differently: both full models are
loaded, the alignment matrices are formed explicitly (``V V^T / ||V||``) and matched to
LoRA layers by zipping ``named_parameters`` in order, lora_A is told from lora_B by
``shape[0] == r``, and ``number`` mode computes the cutoff as the num-th lowest rounded
cosine. Only the device (``cpu``) and the returned values are ours: the code prints the
count and Pdst; this returns them with the cosines and the projected peft model.
"""
from __future__ import annotations

import copy

import numpy
import torch
from transformers import AutoModelForCausalLM


def get_aligned_matrix(peft_config, base_model_path, aligned_model_path):
    base_model = AutoModelForCausalLM.from_pretrained(base_model_path, return_dict=True, device_map="cpu",
                                                      low_cpu_mem_usage=True, dtype=torch.float32)
    aligned_model = AutoModelForCausalLM.from_pretrained(aligned_model_path, return_dict=True, device_map="cpu",
                                                         low_cpu_mem_usage=True, dtype=torch.float32)
    v = []
    proj_modules = list(peft_config.target_modules)
    for (b_name, b_param), (a_name, a_param) in zip(base_model.named_parameters(), aligned_model.named_parameters()):
        if any(module in a_name for module in proj_modules):
            assert b_param.shape == a_param.shape
            vec = a_param - b_param
            vec = torch.mm(vec, vec.t()) / torch.norm(vec)
            v.append((vec).detach().cpu())
    return v


def projected_weighted(peft_model, model_ori, peft_config, project_matrix, thrs_cos):
    v = project_matrix
    idx = 0
    i = 0
    dis = []
    cos_total = []
    for (name, param), (name_ori, param_ori) in zip(peft_model.named_parameters(), model_ori.named_parameters()):
        if 'lora' in name:
            if param.shape[0] == peft_config.r:
                B = copy.deepcopy(param_ori)
            if param.shape[0] != peft_config.r:
                P = v[idx].to(param.device)
                W = torch.mm(P, param_ori.data)
                fW = torch.mm(W, B)
                ori = torch.mm(param_ori, B)
                W_new = torch.mm(P, param_ori.data)
                cos = numpy.round(torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)).item(), 5)
                cos_total.append(cos)

                if cos <= thrs_cos:
                    i += 1
                    param.data = W_new
                else:
                    param.data = param_ori
                dist = 1 / (1 + torch.norm(param.data.reshape(1, -1) - W.reshape(1, -1)))

                dis.append(dist.item())
                idx += 1
    return peft_model, cos_total, i, float(numpy.mean(dis)), dis


@torch.no_grad()
def safelora_reference(peft_model, base_model_path, aligned_model_path, select_layers_type="number",
                       threshold=0.5, num_proj_layers=10):
    """``(projected peft model, cosines, projected count, Pdst, cutoff, Pdst terms)``, as
    ``SafeLoRA.__init__`` (model.py:45-50). A layer the alignment did not change has V = 0, so
    its matrix is 0 / 0 = NaN (model.py:80), its cosine NaN (model.py:100), ``NaN <= cutoff``
    false (model.py:103) and its Pdst term NaN; ``numpy.sort`` puts the NaNs last
    (model.py:49), so in ``number`` mode a cutoff past the finite cosines is NaN and nothing
    is projected. A layer whose output size equals r is taken for a lora_A (model.py:92), and
    the next layer is then paired with the wrong matrix (model.py:95-96)."""
    peft_config = peft_model.peft_config["default"]
    model_ori = copy.deepcopy(peft_model)
    project_matrix = get_aligned_matrix(peft_config, base_model_path, aligned_model_path)
    if select_layers_type == 'threshold':
        model, cos, count, pdst, dis = projected_weighted(peft_model, model_ori, peft_config, project_matrix, threshold)
        return model, cos, count, pdst, threshold, dis
    _, cos, _, _, _ = projected_weighted(peft_model, model_ori, peft_config, project_matrix, 0.3)
    thrs = numpy.sort(cos)[:num_proj_layers][-1]
    model, cos, count, pdst, dis = projected_weighted(peft_model, model_ori, peft_config, project_matrix, thrs)
    return model, cos, count, pdst, float(thrs), dis
