module registry-gateway/bench/benchtool

go 1.23
