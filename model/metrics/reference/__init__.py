"""The reference FID network: readers for its torch pickles (torch_pickle.py) and TorchScript archive
(torchscript.py), and the verification of our InceptionV3 port against it (verify.py,
`python -m model.metrics.inception verify`)."""
