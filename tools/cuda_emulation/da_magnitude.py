"""How large dA (the selection-logit gradient the tensor-core backward packs to fp16) gets for
long sequences with an attention sink at key 1, in fp64 with the reference's math: is there a
realistic risk of exceeding fp16's 65504?   python tools/cuda_emulation/da_magnitude.py
"""
import torch
torch.manual_seed(0)
for N, sinkscale, doutscale in [(1024, 4, 1), (2048, 4, 1), (2048, 2, 4), (4096, 1, 1)]:
    D=64; s=D**-0.5
    q=torch.randn(1,1,N,D,dtype=torch.float64)*1.5; k=torch.randn(1,1,N,D,dtype=torch.float64)*1.5; v=torch.randn(1,1,N,D,dtype=torch.float64)
    k[:,:,1] = q.mean(dim=2)*sinkscale
    qs=q[:,0].clone().requires_grad_(); ks=k[:,0].clone().requires_grad_()
    A = s*(qs@ks.transpose(-1,-2)); A.retain_grad()
    n=N; i=torch.arange(n)[:,None]; j=torch.arange(n)[None]
    S = torch.where((j>=1)&(j<i), torch.relu(A), torch.zeros(()).double())
    inc=S.cumsum(-2); F=torch.cat([torch.zeros_like(inc[...,:1,:]), inc[...,:-1,:]], -2)
    logits = s*(q@k.transpose(-1,-2)) - F[:,None]
    logits = logits.masked_fill(j>i, float('-inf'))
    out = torch.softmax(logits,-1)@v
    dout = torch.randn_like(out)*doutscale
    (out*dout).sum().backward()
    print(N, sinkscale, doutscale, "max|dA|", A.grad.abs().max().item()/s, "max|dq_sel|", qs.grad.abs().max().item(), "max|dk_sel|", ks.grad.abs().max().item(), "max F", F.max().item())
