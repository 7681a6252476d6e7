package client_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

func Example() {
	// A stand-in broker; a real one is reached with DeviceHTTPClient.
	broker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case wire.PathCA:
			fmt.Fprint(w, `{"user_ca_keys":["ssh-ed25519 AAAA user-ca"],"host_ca_keys":[]}`)
		default:
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `{"error":"target db-prod is not allowed for role vendor","code":"policy"}`)
		}
	}))
	defer broker.Close()

	c := client.New(broker.URL, nil)
	ca, err := c.CA(context.Background())
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("user CA:", ca.UserCAKeys[0])

	_, err = c.CreateRequest(context.Background(), wire.CreateRequest{Target: "db-prod", TTL: "45m", Reason: "INC-4821"})
	var apiErr *client.APIError
	if errors.As(err, &apiErr) {
		fmt.Println(apiErr.Status, apiErr.Code+":", apiErr.Message)
	}
	// Output:
	// user CA: ssh-ed25519 AAAA user-ca
	// 403 policy: target db-prod is not allowed for role vendor
}
