// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 because
// `go install` cannot build that module directly (it has replace directives).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
