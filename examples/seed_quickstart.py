# The seed document's program ("联邦学习在图像识别中的应用", section 4), run as written.
# Two changes only, where the seed's own code is broken:
#   1. `import torch.nn.functional as F`, which the seed uses but forgot to import;
#   2. `transforms.Pad(2)`: 28x28 digits padded to 32x32 (as LeNet did), which the seed's
#      `64 * 5 * 5` flatten needs.
# Offline, put MNIST's four .gz files in ./data/MNIST/raw/ (torchvision's layout) first.
# Note: as in the seed, every client trains 5 epochs on the full 60,000-image training set per
# round (1.5 million images a round), so it takes hours on a 2-core CPU and minutes on a GPU;
# examples/partitioned_quickstart.py is the fast, properly partitioned one.
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from fedlearn.core.client import FedClient
from fedlearn.core.server import FedServer

# 定义模型
class CNN(nn.Module):
    def __init__(self):
        super(CNN, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.fc1 = nn.Linear(64 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 64 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x

# 准备数据集
transform = transforms.Compose([
    transforms.Pad(2),
    transforms.ToTensor(),
    transforms.Normalize((0.1307,), (0.3081,))
])
trainset = datasets.MNIST(root='./data', train=True, download=True, transform=transform)
testset = datasets.MNIST(root='./data', train=False, download=True, transform=transform)

# 创建联邦学习客户端和服务器
clients = [FedClient(model=CNN(), train_dataset=trainset, test_dataset=testset) for _ in range(5)]
server = FedServer(clients)

# 进行联邦学习训练
for round in range(10):
    server.train(num_epochs=5, lr=0.01)
    print(f"Round {round+1} finished, global model accuracy: {server.evaluate():.2f}")
