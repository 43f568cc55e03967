"""Run from outside the source tree against an installed wheel: import it and run one op."""
import pathlib

import torch

import bigkernels

location = pathlib.Path(bigkernels.__file__).resolve()
assert "site-packages" in location.parts, f"imported bigkernels from {location}, not from the installed wheel"
assert bigkernels._extension.AVAILABLE, bigkernels._extension.UNAVAILABLE_REASON
cell = bigkernels.nn.LSTMCell(8, 16)
stock = torch.nn.LSTMCell(8, 16)
stock.load_state_dict(cell.state_dict())
x = torch.randn(4, 8)
h, c = cell(x)
hs, cs = stock(x)
torch.testing.assert_close(h, hs, atol=1e-5, rtol=1e-4)
torch.testing.assert_close(c, cs, atol=1e-5, rtol=1e-4)
print(f"wheel OK: bigkernels {bigkernels.__version__} from {location.parent}, lstm_cell matches torch")
