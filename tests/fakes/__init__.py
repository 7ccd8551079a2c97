"""Recording fakes of vendor packages (torch_npu, torch_xmlir, kunlun_ops) for tests."""
