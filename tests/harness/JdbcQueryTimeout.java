// pgjdbc's Statement.setQueryTimeout against a sidecar (tests/harness/jdbc.py runs it): when the
// time is up pgjdbc opens a new connection and sends a CancelRequest with the key the sidecar gave
// this connection; the sidecar must pass it to the server running this connection's statement.
//
//   java -cp /usr/share/java/postgresql.jar JdbcQueryTimeout.java HOST PORT DB USER PASSWORD
//
// Prints "cancelled <SQLSTATE>" (or "not cancelled"), then the answer of a query run afterwards on
// the same connection ("usable").

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;

public class JdbcQueryTimeout {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[3]);
        props.setProperty("password", args[4]);
        props.setProperty("connectTimeout", "15");
        props.setProperty("socketTimeout", "60");
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2];
        try (Connection conn = DriverManager.getConnection(url, props)) {
            try (Statement st = conn.createStatement()) {
                st.setQueryTimeout(1);
                st.execute("SELECT pg_sleep(30)");
                System.out.println("not cancelled");
            } catch (SQLException e) {
                System.out.println("cancelled " + e.getSQLState());
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT 'usable'")) {
                rs.next();
                System.out.println(rs.getString(1));
            }
        }
    }
}
